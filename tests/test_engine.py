"""The engine: accuracy matrix, run directory, orderings that must hold, exact resume."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import yaml

from clpeft import config
from clpeft.engine import Engine
from clpeft.errors import RunError


def _run(cfg_dict, out, **kw):
    return Engine(config.resolve(cfg_dict), out, device="cpu", **kw).run()


def test_run_directory_and_matrix_match_an_independent_evaluation(tmp_path, digits_run):
    digits_run["scenario"]["n_experiences"] = 3
    digits_run["scenario"]["init_classes"] = 4
    digits_run["logging"]["tensorboard"] = True
    out = tmp_path / "run"
    result = _run(digits_run, out)

    for name in ("config.yaml", "metrics.json", "events.jsonl"):
        assert (out / name).is_file()
    assert any((out / "tb").iterdir())
    assert json.loads((out / "metrics.json").read_text()) == json.loads(json.dumps(result))
    R = np.array(result["acc_matrix"])
    assert R.shape == (3, 3)
    assert sum(result["test_sizes"]) == 540  # sklearn digits: 30% of 1,797
    assert R[0, 1] == R[0, 2] == R[1, 2] == 0.0  # unseen classes cannot be predicted
    assert set(result["metrics"]) >= {"acc_final", "acc_seen", "acc_last", "acc_avg_incremental", "bwt", "forgetting", "fwt"}
    assert len(result["baseline"]) == 3 and all(0.0 <= b <= 0.5 for b in result["baseline"])
    timing = result["timing"]["experiences"]
    assert [t["experience"] for t in timing] == [0, 1, 2] and all(t["train_s"] > 0 and t["peak_memory_mb"] > 0 for t in timing)

    # Recompute the last row from the final checkpoint with plain torch.
    from clpeft import checkpoint

    _, state = checkpoint.load_latest(out / "checkpoints")
    cfg = config.resolve(digits_run)
    built = Engine(cfg, tmp_path / "scratch", device="cpu").build()
    stream, strategy = built.stream, built.strategy
    strategy.load_state_dict(state["strategy"])
    net = torch.nn.Sequential(strategy.backbone.net, torch.nn.Linear(64, 10))
    net[1].weight.data, net[1].bias.data = strategy.head.weight.data, strategy.head.bias.data
    for j, exp in enumerate(stream):
        x, y = exp.test.load()
        with torch.no_grad():
            pred = net(x.flatten(1).float() / 255.0).argmax(1)
        assert int((pred == y).sum()) / len(y) == pytest.approx(R[2, j], abs=1e-12)

    events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    assert [e["step"] for e in events if e["event"] == "experience_end"] == [0, 1, 2]

    # The run directory is a merge input: model.safetensors holds the final weights.
    from clpeft.merging.io import open_checkpoint

    with open_checkpoint(out) as source:
        assert torch.equal(source.read("head.weight"), strategy.head.weight.data)
        assert set(source.keys()) == {k for k, v in strategy.state_dict().items() if isinstance(v, torch.Tensor)}


def test_replay_forgets_less_than_finetune(tmp_path, digits_run):
    finetune = _run(digits_run, tmp_path / "finetune")["metrics"]
    digits_run["strategy"] = {"name": "replay", "mem_size": 200}
    replay = _run(digits_run, tmp_path / "replay")["metrics"]
    assert replay["forgetting"] < finetune["forgetting"] - 0.3
    assert replay["acc_last"] > finetune["acc_last"] + 0.3


def test_joint_beats_finetune(tmp_path, digits_run):
    finetune = _run(digits_run, tmp_path / "finetune")["metrics"]
    digits_run["strategy"] = {"name": "joint"}
    joint = _run(digits_run, tmp_path / "joint")["metrics"]
    assert joint["acc_last"] > 0.85 > finetune["acc_last"] + 0.5
    assert joint["forgetting"] < 0.1


def test_same_seed_same_matrix_other_seed_differs(tmp_path, digits_run):
    digits_run["scenario"]["n_experiences"] = 2
    a = _run(digits_run, tmp_path / "a")["acc_matrix"]
    b = _run(digits_run, tmp_path / "b")["acc_matrix"]
    digits_run["seed"] = 1
    c = _run(digits_run, tmp_path / "c")["acc_matrix"]
    assert a == b
    assert a != c


def test_existing_run_directory_needs_resume(tmp_path, digits_run, capsys):
    digits_run["scenario"]["n_experiences"] = 2
    _run(digits_run, tmp_path / "run")
    from clpeft.errors import UserError

    with pytest.raises(UserError, match=r"already holds a run \(config.yaml, metrics.json, .*checkpoints\); pass --resume"):
        _run(digits_run, tmp_path / "run")
    digits_run["train"]["lr"] = 0.1
    with pytest.raises(UserError, match=r"config differs from the stored run \(train.lr: 0.05 -> 0.1\)"):
        _run(digits_run, tmp_path / "run", resume=True)


# ----------------------------------------------------------------------------- resume

KILLER = textwrap.dedent('''
    import os, signal
    from clpeft.strategies.replay import Replay

    class KillableReplay(Replay):
        """Replay that SIGKILLs its own process at a chosen point (for resume tests)."""

        def __init__(self, backbone, kill_at: list[int] | None = None, mem_size: int = 100):
            super().__init__(backbone, mem_size=mem_size)
            self.kill_at = kill_at  # [experience, training step] or [experience, -1] = during evaluation
            self.exp, self.steps = -1, 0

        def before_experience(self, exp):
            super().before_experience(exp)
            self.exp, self.steps = exp.index, 0

        def training_step(self, batch):
            self.steps += 1
            if self.kill_at == [self.exp, self.steps]:
                os.kill(os.getpid(), signal.SIGKILL)
            return super().training_step(batch)

        def predict(self, x):
            if self.kill_at == [self.exp, -1] and not self.training:
                os.kill(os.getpid(), signal.SIGKILL)
            return super().predict(x)
''')


def _cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "clpeft", *args], cwd=cwd, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize(
    "freeze,kill_at",
    [
        (False, [2, 5]),
        (True, [3, -1]),
        pytest.param(True, [2, 5], marks=pytest.mark.slow),
        pytest.param(False, [3, -1], marks=pytest.mark.slow),
    ],
    ids=["trainable-mid-epoch", "frozen-mid-evaluation", "frozen-mid-epoch", "trainable-mid-evaluation"],
)
def test_killed_run_resumes_to_the_same_matrix(tmp_path, digits_run, freeze, kill_at, monkeypatch):
    (tmp_path / "killer.py").write_text(KILLER)
    digits_run["strategy"] = {"name": "killer.py:KillableReplay"}
    digits_run["backbone"]["freeze"] = freeze
    digits_run["train"]["epochs"] = 2
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(digits_run))

    monkeypatch.chdir(tmp_path)
    _run(digits_run, tmp_path / "ref")  # the uninterrupted reference, in this process
    killed = _cli("run", "run.yaml", "--out", "killed", "--device", "cpu", "--set", f"strategy.kill_at={kill_at}", cwd=tmp_path)
    assert killed.returncode == -9  # SIGKILL
    kept = sorted(p.name for p in (tmp_path / "killed" / "checkpoints").glob("exp_*.pt"))
    assert kept[-1] == f"exp_{kill_at[0] - 1:03d}.pt"  # the last completed experience
    assert not (tmp_path / "killed" / "metrics.json").exists()

    resumed = _cli("run", "killed", "--resume", "--force", "--set", "strategy.kill_at=null", "--device", "cpu", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed from exp_" in resumed.stdout
    a = json.loads((tmp_path / "ref" / "metrics.json").read_text())
    b = json.loads((tmp_path / "killed" / "metrics.json").read_text())
    assert a["acc_matrix"] == b["acc_matrix"]  # bitwise: JSON floats round-trip exactly
    assert a["metrics"] == b["metrics"]


def test_non_finite_loss_stops_with_the_experience_and_keeps_checkpoints(tmp_path, digits_run):
    digits_run["scenario"]["n_experiences"] = 2
    digits_run["train"]["lr"] = 1e30
    digits_run["train"]["optimizer"] = "sgd"
    out = tmp_path / "run"
    with pytest.raises(RunError, match=r"non-finite loss .* at experience \d, epoch \d, step \d+; lower train.lr"):
        _run(digits_run, out)
    assert os.path.isdir(out) and not (out / "metrics.json").exists()


def test_bf16_on_cpu_is_refused_before_anything_runs(tmp_path, digits_run):
    from clpeft.errors import UserError

    digits_run["train"]["amp"] = "bf16"
    with pytest.raises(UserError, match="train.amp: bf16 autocast runs on CUDA only"):
        _run(digits_run, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_deterministic_runs_give_identical_metrics_json(tmp_path, digits_run):
    digits_run["scenario"]["n_experiences"] = 2
    digits_run["strategy"] = {"name": "ewc"}  # per-sample gradients (vmap) must be deterministic too
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(digits_run))
    outputs = []
    for name in ("a", "b"):
        proc = _cli("run", "run.yaml", "--out", name, "--device", "cpu", "--deterministic", cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        data = json.loads((tmp_path / name / "metrics.json").read_text())
        data.pop("timing")
        data.pop("provenance")  # what ran it (code commits change while the suite runs), not what it computed
        outputs.append(data)
    assert outputs[0] == outputs[1]


def test_multistep_schedule_multiplies_the_lr_by_gamma_from_each_milestone_epoch(tmp_path, digits_run):
    from torch.optim.optimizer import register_optimizer_step_pre_hook

    seen = []
    digits_run["scenario"]["n_experiences"] = 2
    digits_run["train"].update(epochs=4, lr=0.2, schedule="multistep", milestones=[1, 3], gamma=0.5)
    handle = register_optimizer_step_pre_hook(lambda opt, args, kwargs: seen.append(opt.param_groups[0]["lr"]))
    try:
        _run(digits_run, tmp_path / "run")
    finally:
        handle.remove()
    per_epoch = len(seen) // 8  # 2 experiences x 4 epochs of equal size; the schedule restarts per experience
    expected = ([0.2] * per_epoch + [0.1] * 2 * per_epoch + [0.05] * per_epoch) * 2
    assert per_epoch > 1 and seen == pytest.approx(expected, rel=1e-9)


def test_multistep_milestones_are_checked_against_the_epochs(tmp_path, digits_run, capsys):
    from clpeft.cli import main

    digits_run["train"].update(epochs=4, schedule="multistep", milestones=[2, 4])
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(digits_run))
    assert main(["validate", str(path)]) == 2
    assert "train.milestones: value error, must increase strictly within 1..3" in capsys.readouterr().err
    digits_run["train"]["milestones"] = []
    path.write_text(yaml.safe_dump(digits_run))
    assert main(["validate", str(path)]) == 2
    assert "train.milestones: value error, empty with schedule multistep" in capsys.readouterr().err


def test_cosine_schedule_and_gradient_clipping_act_on_every_step(tmp_path, digits_run):
    """lr_t = lr/2 (1 + cos(pi t / T)) over each experience's T steps (Loshchilov & Hutter 2017),
    and every step sees a gradient of global norm <= clip_grad (while unclipped ones exceed it)."""
    import math

    from torch.optim.optimizer import register_optimizer_step_pre_hook

    seen = []

    def record(optimizer, args, kwargs):
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        seen.append((optimizer.param_groups[0]["lr"], float(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])))))

    digits_run["scenario"]["n_experiences"] = 2
    digits_run["train"].update(epochs=2, lr=0.5)
    handle = register_optimizer_step_pre_hook(record)
    try:
        _run(digits_run, tmp_path / "plain")
        plain = list(seen)
        seen.clear()
        digits_run["train"].update(schedule="cosine", clip_grad=0.05)
        _run(digits_run, tmp_path / "clipped")
    finally:
        handle.remove()
    steps = len(seen) // 2  # the same number of steps in both experiences (5 classes each)
    expected = [0.25 * (1 + math.cos(math.pi * t / steps)) for t in range(steps)] * 2
    assert [lr for lr, _ in seen] == pytest.approx(expected, rel=1e-6)
    assert all(lr == 0.5 for lr, _ in plain)
    assert max(norm for _, norm in seen) <= 0.05 * (1 + 1e-5)
    assert max(norm for _, norm in plain) > 0.05


def test_drop_last_skips_each_epochs_smaller_batch(tmp_path, digits_run, monkeypatch):
    """``train.drop_last``: as a DataLoader with ``drop_last=True``, every step sees a full batch."""
    from clpeft.strategy import Strategy

    sizes = []
    original = Strategy.training_step
    monkeypatch.setattr(Strategy, "training_step", lambda self, batch: sizes.append(len(batch.y)) or original(self, batch))
    digits_run["scenario"]["n_experiences"] = 1
    digits_run["train"].update(epochs=2, batch_size=100)
    n_train = 1257  # sklearn digits' training split
    _run({**digits_run, "train": {**digits_run["train"], "drop_last": True}}, tmp_path / "dropped")
    assert sizes == [100] * (2 * (n_train // 100))
    sizes.clear()
    _run(digits_run, tmp_path / "kept")
    assert sizes == ([100] * (n_train // 100) + [n_train % 100]) * 2


def test_nesterov_sgd_is_torchs(tmp_path):
    """``train.nesterov``: the optimizer the engine builds steps as ``torch.optim.SGD(nesterov=True)``."""
    from clpeft.config import TrainConfig
    from clpeft.training import make_optimizer

    torch.manual_seed(0)
    a, b = torch.nn.Parameter(torch.randn(5)), None
    b = torch.nn.Parameter(a.detach().clone())
    ours = make_optimizer([{"params": [a]}], TrainConfig(lr=0.1, momentum=0.9, nesterov=True))
    theirs = torch.optim.SGD([b], lr=0.1, momentum=0.9, nesterov=True)
    plain = make_optimizer([{"params": [c := torch.nn.Parameter(a.detach().clone())]}], TrainConfig(lr=0.1, momentum=0.9))
    for _ in range(3):
        for p, opt in ((a, ours), (b, theirs), (c, plain)):
            opt.zero_grad()
            (p**3).sum().backward()
            opt.step()
    assert torch.equal(a, b) and not torch.equal(a, c)
    with pytest.raises(ValueError, match="Nesterov momentum needs train.momentum > 0"):
        TrainConfig(momentum=0.0, nesterov=True)


@pytest.mark.parametrize(("epochs", "steps", "min_lr"), [(20, 3, 0.0), (5, 2, 1e-8), (1, 4, 0.0)])
def test_cosine_epoch_is_cosine_annealing_stepped_per_epoch(epochs, steps, min_lr):
    """``schedule: cosine_epoch``: every step of epoch ``e`` at ``CosineAnnealingLR(T_max=epochs, eta_min=min_lr)``'s
    rate after ``e`` epoch steps (LAMDA-PILOT's APER and RanPAC trainers), per parameter group (two base rates)."""
    from clpeft.config import TrainConfig
    from clpeft.training import make_optimizer, make_scheduler

    cfg = TrainConfig(epochs=epochs, lr=0.1, schedule="cosine_epoch", min_lr=min_lr)

    def groups():
        return [
            {"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 0.1},
            {"params": [torch.nn.Parameter(torch.zeros(1))], "lr": 0.001},
        ]

    ours = make_optimizer(groups(), cfg)
    scheduler = make_scheduler(ours, cfg, steps)
    theirs = torch.optim.SGD(groups(), lr=0.1, momentum=0.9)
    reference = torch.optim.lr_scheduler.CosineAnnealingLR(theirs, T_max=epochs, eta_min=min_lr)
    for _ in range(epochs):
        for _ in range(steps):
            for a, b in zip(ours.param_groups, theirs.param_groups):
                assert a["lr"] == pytest.approx(b["lr"], rel=1e-12, abs=1e-15)
            ours.step()
            scheduler.step()
        theirs.step()
        reference.step()


def test_an_experience_with_too_few_optimizer_steps_is_warned_about(tmp_path, digits_run, capsys):
    """Issue 21: a minimal config trained 4 steps per experience and reported an untrained model silently."""
    digits_run["scenario"]["n_experiences"] = 5
    digits_run["train"].update(epochs=1, batch_size=64)
    _run(digits_run, tmp_path / "few")
    out = capsys.readouterr().out
    assert "warning: experience 0 trains for only 4 optimizer steps (1 epoch(s) x 4 batches of 64)" in out
    digits_run["train"].update(epochs=3, batch_size=32)  # 8 batches x 3 epochs = 24 steps
    _run(digits_run, tmp_path / "enough")
    assert "optimizer steps" not in capsys.readouterr().out
