"""Data-parallel runs: ``torchrun`` with 2 CPU processes (gloo) against 1 process.

The stream is small and its sizes are chosen so that every experience's last global batch has
a single sample: rank 1's share of it is empty, the hardest case for the gradient average.
Tolerance for trained methods: the accuracy matrices agree to within one test sample per cell
(the ranks sum gradients in another order than one process); SimpleCIL has no gradient and
must agree exactly.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml

from clpeft import checkpoint
from clpeft.components import AlignedHead, ClassStatistics, InputSubspace, LinearHead, LoRALinear, PromptPool
from clpeft.distributed import World, check_consistent, current
from clpeft.errors import RunError

TRAIN_PER_CLASS, BATCH = 25, 49  # 50 training samples per experience: global batches of 49 and 1
TEST_PER_CLASS = 20
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
EXTRA = {  # lora_cl grows its ranks mid-experience (IncreLoRA): rank 1 -> 4 at steps 6, 12, 18 of 30
    # (adapting one layer of a frozen random MLP: it learns less than finetune)
    "replay": {"mem_size": 40},
    "lora_cl": {"targets": ["net.0"], "rank": 1, "alpha": 1.0, "rank_budget": 4, "grow_every": 6, "train_mask": False},
}


def _config(tmp_path: Path, strategy: str) -> Path:
    config = {
        "seed": 3,
        "scenario": {
            "name": "class_incremental",
            "dataset": "sklearn_digits",
            "n_experiences": 5,
            "train_per_class": TRAIN_PER_CLASS,
            "test_per_class": TEST_PER_CLASS,
        },
        "backbone": {"name": "mlp", "hidden": [64]},
        "strategy": {"name": strategy, **EXTRA.get(strategy, {})},
        "train": {"epochs": 15, "batch_size": BATCH, "lr": 0.1},
        "logging": {"tensorboard": False, "progress": "never", "keep_checkpoints": 5},
    }
    path = tmp_path / f"{strategy}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _run(args: list[str], nproc: int = 1) -> subprocess.CompletedProcess:
    launcher = (
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1 else [sys.executable]
    )
    return subprocess.run(
        [*launcher, "-m", "clpeft", "run", *args, "--device", "cpu"], capture_output=True, text=True, env=ENV, timeout=300
    )


def _matrix(run_dir: Path) -> np.ndarray:
    return np.array(json.loads((run_dir / "metrics.json").read_text())["acc_matrix"])


def _pair(tmp_path: Path, strategy: str) -> tuple[np.ndarray, np.ndarray, Path]:
    config = _config(tmp_path, strategy)
    single, double = tmp_path / f"{strategy}-1", tmp_path / f"{strategy}-2"
    for out, nproc in ((single, 1), (double, 2)):
        done = _run([str(config), "--out", str(out)], nproc)
        assert done.returncode == 0, done.stderr[-2000:]
    return _matrix(single), _matrix(double), double


@pytest.mark.parametrize(
    "strategy",
    # plain fine-tuning is replay without its buffer: in the slow suite only (~30 s of two-process runs)
    [pytest.param("finetune", marks=pytest.mark.slow), "replay", "lora_cl"],
)
def test_two_processes_match_one_process(tmp_path, strategy):
    one, two, run_dir = _pair(tmp_path, strategy)
    assert one.shape == two.shape == (5, 5)
    assert np.abs(one - two).max() <= 1 / (2 * TEST_PER_CLASS) + 1e-12  # at most one test sample per cell
    assert one.diagonal().mean() > (0.7 if strategy == "lora_cl" else 0.8)  # trained, not two equally broken runs
    # rank 0 alone wrote: one events file, one checkpoint per kept experience
    assert len(checkpoint.list_checkpoints(run_dir / "checkpoints")) >= 1
    assert (run_dir / "events.jsonl").read_text().count('"run_start"') == 1


def test_simplecil_matches_exactly_and_two_process_checkpoints_resume_in_one(tmp_path):
    one, two, run_dir = _pair(tmp_path, "simplecil")
    np.testing.assert_array_equal(one, two)
    # keep only the 2-process checkpoint of experience 1, resume with 1 process
    for path in checkpoint.list_checkpoints(run_dir / "checkpoints")[2:]:
        path.unlink()
    (run_dir / "metrics.json").unlink()
    done = _run([str(run_dir), "--resume"])
    assert done.returncode == 0, done.stderr[-2000:]
    assert "continuing at experience 2/5" in done.stdout
    np.testing.assert_array_equal(_matrix(run_dir), one)


def test_test_time_adaptation_refuses_torchrun(tmp_path):
    config = tmp_path / "tta.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "scenario": {"name": "test_time_adaptation", "dataset": "sklearn_digits", "corruptions": ["gaussian_noise"]},
                "backbone": {"name": "mlp"},
                "strategy": {"name": "tent"},
                "logging": {"tensorboard": False, "progress": "never"},
            }
        )
    )
    done = _run([str(config), "--out", str(tmp_path / "run")], nproc=2)
    assert done.returncode != 0
    # each rank exits 2 with the one-line error; the launcher's own summary follows it
    assert "clpeft: error: scenario.name: test-time adaptation adapts online" in done.stderr
    assert "exitcode  : 2" in done.stderr and "exitcode  : 1 " not in done.stderr
    assert "/clpeft/" not in done.stderr  # no traceback through clpeft's code


# ------------------------------------------------------------------ collectives, in 2 spawned processes


def _in_two_processes(fn, tmp_path: Path) -> None:
    mp.spawn(_worker, args=(fn, str(tmp_path / "rendezvous")), nprocs=2, join=True)


def _worker(rank: int, fn, rendezvous: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=2)
    try:
        fn(current())
    finally:
        dist.destroy_process_group()


def _gathered_statistics_equal_the_whole(world: World) -> None:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(30, 4, generator=generator, dtype=torch.float64)
    y = torch.randint(0, 3, (30,), generator=generator)
    whole = ClassStatistics(4, covariance="per_class")
    whole.update(x, y)
    share = ClassStatistics(4, covariance="per_class")
    share.update(x[world.shard(torch.arange(30))], y[world.shard(torch.arange(30))])
    merged = share.gathered(world)
    torch.testing.assert_close(merged.counts, whole.counts, rtol=0, atol=0)
    torch.testing.assert_close(merged.mean, whole.mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(merged.scatter, whole.scatter, rtol=1e-12, atol=1e-12)


def _prompt_counts_are_summed(world: World) -> None:
    pool = PromptPool(pool_size=4, length=1, embed_dim=2, top_k=1, key_dim=2)
    with torch.no_grad():
        pool.keys.copy_(torch.eye(4, 2) + torch.tensor([[0, 0], [0, 0], [-2, 0], [0, -2]]))
    pool(torch.tensor([[1.0, 0.0]] * (world.rank + 1)), train=True)  # rank 0 selects key 0 once, rank 1 twice
    pool.synchronize(world)
    assert pool.counts.tolist() == [3.0, 0.0, 0.0, 0.0]
    assert pool.pending.sum() == 0


def _divergence_is_named(world: World) -> None:
    model = torch.nn.Linear(2, 2)
    torch.nn.init.zeros_(model.weight)
    torch.nn.init.zeros_(model.bias)
    check_consistent(world, model, "experience 0")  # equal: passes
    if world.rank == 1:
        model.bias.data[0] = 1.0
    with pytest.raises(
        RunError, match=r"diverged after experience 1" + (r".*rank 1 differs from rank 0 in \['bias'\]" if world.rank else "")
    ):
        check_consistent(world, model, "experience 1")


def _input_covariances_and_drift_compensation_equal_the_whole(world: World) -> None:
    """InfLoRA's covariances and SDC's drift from each rank's share equal the formulas on the whole data."""
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(30, 4, generator=generator)
    layer = LoRALinear(torch.nn.Linear(4, 3), rank=1, alpha=1.0)
    shard = world.shard(torch.arange(30))
    covariance = InputSubspace.covariances({"l": layer}, lambda: layer(x[shard]))[0]
    torch.testing.assert_close(covariance, x.double().T @ x.double() / 30, rtol=1e-12, atol=1e-12)

    y = torch.arange(3).repeat(10)
    moved = x + 0.3 * torch.randn(30, 4, generator=generator)
    old, new = torch.nonzero(y < 2).flatten(), torch.nonzero(y == 2).flatten()
    head = LinearHead(4, 2)
    aligned = AlignedHead(4, drift_compensation=True, drift_sigma=0.5, samples_per_class=8, epochs=1)
    aligned.update(head, [(x[world.shard(old)], y[world.shard(old)])], task=0)
    aligned.track([(x[world.shard(new)], y[world.shard(new)])])
    head.grow_to(3)
    aligned.update(head, [(moved[world.shard(new)], y[world.shard(new)])], task=1)
    # the whole data, by the formula: Gaussian weights of every new sample around each old mean
    before, after = x[new].double(), moved[new].double()
    sigma = 0.5 * before.norm(dim=1).mean()
    means = torch.stack([x[y == c].double().mean(0) for c in (0, 1)])
    weights = torch.softmax(-torch.cdist(means, before).square() / (2 * sigma**2), dim=1)
    expected = torch.cat([means + weights @ (after - before), after.mean(0, keepdim=True)])
    torch.testing.assert_close(aligned.alignment.stats.means(), expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize(
    "fn",
    [
        _gathered_statistics_equal_the_whole,
        _prompt_counts_are_summed,
        _divergence_is_named,
        _input_covariances_and_drift_compensation_equal_the_whole,
    ],
)
def test_collectives_across_two_processes(tmp_path, fn):
    _in_two_processes(fn, tmp_path)


def test_one_process_world_is_a_no_op():
    world = current()
    assert world == World(0, 1) and world.is_main and not world.active
    t = torch.tensor([1.0, 2.0])
    assert world.all_reduce_sum(t) is t and t.tolist() == [1.0, 2.0]
    stats = ClassStatistics(2)
    assert stats.gathered() is stats
    assert world.shard(torch.arange(5)).tolist() == [0, 1, 2, 3, 4]
    assert World(1, 2).shard(torch.arange(5)).tolist() == [1, 3]
