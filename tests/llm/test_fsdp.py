"""``train.sharding: fsdp`` (:mod:`clpeft.fsdp`) on the tiny random Llama, two CPU processes (gloo) against one.

* In two spawned processes: every parameter is split from the build on, before any training
  (each rank holds half of a weight of 32 rows; the module's own tensor is a host copy), and a
  state loaded then reaches each rank's chunk; one sharded training step gives each rank its chunk
  of the one-process gradient of the same global batch (rtol 1e-5, atol 1e-7: one float32 sum in
  another order); reading the state while training is refused, and after it the state refreshed
  from the shards equals the unsharded one bit for bit (one-process format). Greedy decoding and
  the engine's evaluation run sharded in lockstep: at every forward the other decoder layers hold
  half of each weight (a hook), the ranks decode different numbers of prompts and tokens, or score
  uneven shares of the test sets (batches of 3 from 10: 2, 2, 2, 1 and 1, 1, 1, 0), yet run the
  same number of forwards in each lockstep block (the less busy one pads with one-token forwards;
  which one is busier can change from block to block), and the answers and accuracies are the
  unsharded model's.
* Through ``torchrun`` and the real engine: a 2-task ``seq_finetune`` stream (the ``distinct_tasks``
  files: a fixed train/test split) whose global batches of 37 and 1 split into 19 + 18 and 1 + 0
  (rank 1's empty share still joins the collectives) gives the one-process accuracy matrix exactly
  and its LoRA weights within ``atol = 1e-5`` (observed 2.0e-6 on weights of size 0.5 to 1, and
  the same bits in repeated two-process runs): FSDP's reduce-scatter adds the two ranks'
  half-batch gradients where one process sums the whole batch, a float32 rounding difference of
  about 1e-7 per step, which 64 Adam steps (2 tasks x 16 epochs x 2 batches; each moves an element
  by about ``lr`` whatever its gradient's size) carry into the weights; the frozen pretrained
  weights stay bit-identical. Rank 0's exports (each task's adapter, the merged model), written
  from the whole model's host copies, equal the one-process ones: adapters to the same 1e-5, the
  merged q/v weights to 1e-4 (``alpha / r = 4`` times a rank-4 sum of those differences), the rest bit for bit.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
import yaml

import clpeft.config
from clpeft.data import Batch
from clpeft.engine import Engine
from clpeft.errors import UserError

BATCH = 37  # 38 training examples per task: global batches of 37 and 1
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


def _config(weights, tasks, sharding="fsdp", general_text_samples=0) -> dict:
    return {
        "seed": 0,
        "scenario": {"name": "instruction_incremental", "tasks": [{"jsonl": str(p), "max_new_tokens": 4} for p in tasks]},
        "backbone": {"name": "generative_lm", "weights": str(weights)},
        "strategy": {
            "name": "seq_finetune",
            "lora_targets": ["q_proj", "v_proj"],
            "lora_rank": 4,
            "general_text_samples": general_text_samples,
        },
        "train": {"epochs": 16, "batch_size": BATCH, "lr": 0.02, "optimizer": "adam", "sharding": sharding},
        "eval": {"batch_size": 32, "baseline": False},
        "logging": {"tensorboard": False, "progress": "never"},
    }


# ------------------------------------------------------------------ two spawned processes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _lora_b(strategy) -> None:
    """Every LoRA B drawn from one seed (as if trained): the adapters change the answers."""
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in sorted(strategy.named_parameters()):
            if name.endswith("lora_B"):
                p.copy_(torch.randn(p.shape, generator=generator) * 0.5)


class _Forwards:
    """Counts the net's forwards (``real``: those with a real token, not lockstep's masked padding token) and checks,
    at each, that the other decoder layers hold half of each weight (the model is not gathered)."""

    def __init__(self, net):
        from torch.distributed.tensor import DTensor

        self.net, self.layers, self.dtensor = net, net.model.layers, DTensor
        self.total = self.real = 0
        self.handles = [net.register_forward_pre_hook(self.count, with_kwargs=True, prepend=True)]
        self.handles += [layer.register_forward_pre_hook(self.sharded_elsewhere) for layer in self.layers]

    def count(self, module, args, kwargs) -> None:
        self.total += 1
        mask = kwargs.get("attention_mask")
        self.real += mask is not None and bool(mask.any())

    def sharded_elsewhere(self, layer, args) -> None:
        for other in self.layers:
            if other is not layer:
                weight = other.self_attn.q_proj.base_layer.weight
                assert isinstance(weight, self.dtensor) and weight.to_local().numel() * 2 == weight.numel()

    def remove(self) -> tuple[int, int]:
        for handle in self.handles:
            handle.remove()
        return self.total, self.real


def _sharded_worker(rank: int, port: int, weights: str, tasks: list[str], out: str) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    from torch.distributed.tensor import DTensor

    from clpeft import fsdp
    from clpeft.training import training_step_fn

    config = {**_config(weights, tasks), "eval": {"batch_size": 3, "baseline": False}}  # test sets of 10: shares 2, 2, 2, 1 and 1, 1, 1, 0
    sharded = Engine(clpeft.config.resolve(config), out, device="cpu").build()
    plain = Engine(clpeft.config.resolve({**config, "train": {**config["train"], "sharding": "none"}}), out, device="cpu").build()
    world, strategy, reference = sharded.world, sharded.strategy, plain.strategy
    assert world.size == 2

    # built sharded, before any training or evaluation: every parameter of the net split in two along its rows
    pairs = fsdp._of(strategy).pairs
    assert len(pairs) == len(list(reference.backbone.net.parameters()))
    for record, original in pairs:
        registered = getattr(record._module_info.module, record._module_info.param_name)
        assert isinstance(registered, DTensor) and original.numel() == registered.numel()  # the whole tensor: a host copy
        local = registered.to_local().numel()
        assert local == registered.numel() // 2 if registered.shape[0] % 2 == 0 else local > 0
        total = world.all_reduce_sum(torch.tensor([float(local)]))
        assert int(total) == registered.numel()
    q = strategy.backbone.net.model.layers[0].self_attn.q_proj
    assert tuple(q.base_layer.weight.to_local().shape) == (16, 32) and tuple(q.lora_B.to_local().shape) == (16, 4)
    optimized = strategy.param_groups(0.1)[0]["params"]
    assert sum(isinstance(p, DTensor) for p in optimized) == 8  # the optimizer holds the LoRA's shards

    # a state loaded into the sharded model (a resume) reaches every rank's chunks
    _lora_b(reference)
    strategy.load_state_dict(reference.state_dict())
    chunk = torch.chunk(reference.backbone.net.model.layers[0].self_attn.q_proj.lora_B.detach(), 2)[world.rank]
    assert torch.equal(q.lora_B.to_local(), chunk)

    # one step on a global batch: each rank's chunk of the one-process gradient
    data, _ = sharded.stream[0].train.load()
    global_batch = list(data[:BATCH])
    share = world.shard(torch.arange(BATCH)).tolist()
    strategy.train()
    loss, mean, _ = training_step_fn(strategy, world)(Batch([global_batch[i] for i in share], torch.zeros(len(share))), BATCH)
    loss.backward()
    reference.train()
    expected = reference.training_step(Batch(global_batch, torch.zeros(BATCH)))
    expected.backward()
    assert mean == pytest.approx(expected.item(), rel=1e-6)
    grads = dict(reference.named_parameters())
    for name, p in strategy.named_parameters():
        if isinstance(p, DTensor) and p.requires_grad:
            torch.testing.assert_close(p.grad.to_local(), torch.chunk(grads[name].grad, 2)[world.rank], rtol=1e-5, atol=1e-7)
    strategy.zero_grad(set_to_none=True)
    with pytest.raises(RuntimeError, match="not while training"):
        strategy.state_dict()  # the host copies are stale while training

    # evaluation: the whole state refreshed from the shards, in the one-process format, bit for bit
    strategy.eval()
    reference.eval()
    mine, theirs = strategy.state_dict(), reference.state_dict()
    assert mine.keys() == theirs.keys() and mine["backbone.omitted_pretrained_weights"] == theirs["backbone.omitted_pretrained_weights"]
    for key, value in theirs.items():
        if isinstance(value, torch.Tensor):
            assert type(mine[key]) is torch.Tensor and torch.equal(mine[key], value), key

    # greedy answers, sharded and in lockstep: rank 0 decodes 3 prompts up to 8 tokens, rank 1 one token of one prompt
    prompts, tokens = ([e.prompt for e in data[:3]], 8) if world.rank == 0 else ([data[5].prompt], 1)
    forwards = _Forwards(strategy.backbone.net)
    with fsdp.lockstep(strategy):
        answers = strategy.backbone.generate(prompts, tokens, [])
    counts = world.all_gather_object(forwards.remove())
    assert answers == reference.backbone.generate(prompts, tokens, [])
    assert any(answers)
    assert counts[0][0] == counts[1][0] and counts[1][1] == 1 < counts[0][1], counts  # padded to the busiest rank's forwards

    # the engine's evaluation, sharded: uneven shares; in each lockstep block (an experience's test set, the final
    # metrics) as many forwards on both ranks as the busier one's real ones (which rank is busier may change from block
    # to block: greedy answers stop at different lengths); the one-process accuracies
    assert [len(e.test) for e in sharded.stream] == [10, 10]
    forwards, blocks, lockstep = _Forwards(strategy.backbone.net), [], fsdp.lockstep

    @contextlib.contextmanager
    def counted(block_strategy):
        before = (forwards.total, forwards.real)
        with lockstep(block_strategy):
            yield
        blocks.append((forwards.total - before[0], forwards.real - before[1]))

    fsdp.lockstep = counted
    try:
        accuracies = sharded.evaluate()
    finally:
        fsdp.lockstep = lockstep
    forwards.remove()
    ours, others = world.all_gather_object(blocks)
    assert len(ours) == len(others) >= 2 and sum(r for _, r in ours) != sum(r for _, r in others), (ours, others)
    for (total, real), (other_total, other_real) in zip(ours, others):
        assert total == other_total == max(real, other_real), (ours, others)
    assert accuracies == plain.evaluate()

    # .to() moves the shards, the host copies stay
    strategy.to("cpu")
    assert isinstance(q.lora_B, DTensor) and type(mine["backbone.net.model.layers.0.self_attn.q_proj.lora_B"]) is torch.Tensor


def test_parameters_stay_sharded_from_build_through_evaluation(tiny_lm, two_tasks, tmp_path):
    mp.spawn(_sharded_worker, args=(_free_port(), str(tiny_lm), [str(p) for p in two_tasks], str(tmp_path / "run")), nprocs=2, join=True)


def test_refusals_name_the_key(tiny_lm, two_tasks, tmp_path):
    config = _config(tiny_lm, two_tasks)
    lwf = {**config, "strategy": {**config["strategy"], "name": "lwf"}}  # its teacher pass calls the net functionally
    with pytest.raises(UserError, match="strategy lwf cannot train sharded") as caught:
        Engine(clpeft.config.resolve(lwf), tmp_path / "a", device="cpu").build()
    assert caught.value.key == "train.sharding"
    mlp = {
        **config,
        "scenario": {"name": "class_incremental", "dataset": "sklearn_digits", "n_experiences": 2},
        "backbone": {"name": "mlp"},
        "strategy": {"name": "finetune"},
    }
    with pytest.raises(UserError, match="fsdp shards a generative_lm backbone") as caught:
        Engine(clpeft.config.resolve(mlp), tmp_path / "b", device="cpu").build()
    assert caught.value.key == "train.sharding"


# ------------------------------------------------------------------ torchrun and the engine


def _run(args: list[str], nproc: int) -> subprocess.CompletedProcess:
    launcher = (
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1 else [sys.executable]
    )
    return subprocess.run(
        [*launcher, "-m", "clpeft", "run", *args, "--device", "cpu"], capture_output=True, text=True, env=ENV, timeout=300
    )


def _one_and_two(tiny_lm, tasks, tmp_path) -> tuple[Path, dict]:
    """The config run in one process and in two sharded ones: ``{1: metrics.json, 2: ...}`` (runs ``run1``, ``run2``)."""
    config = tmp_path / "fsdp.yaml"
    exported = {
        **_config(tiny_lm, tasks, general_text_samples=8),
        "logging": {"tensorboard": False, "progress": "never", "export": ["adapters", "merged"]},
    }
    config.write_text(yaml.safe_dump(exported))
    results = {}
    for nproc in (1, 2):
        done = _run([str(config), "--out", str(tmp_path / f"run{nproc}")], nproc)
        assert done.returncode == 0, done.stderr[-3000:]
        results[nproc] = json.loads((tmp_path / f"run{nproc}" / "metrics.json").read_text())
    return config, results


def test_two_sharded_processes_match_one_process(tiny_lm, distinct_tasks, tmp_path):
    from safetensors.torch import load_file

    _, results = _one_and_two(tiny_lm, distinct_tasks, tmp_path)
    one, two = (np.asarray(results[n]["acc_matrix"]) for n in (1, 2))
    np.testing.assert_array_equal(two, one)
    metrics = [results[n]["metrics"] for n in (1, 2)]  # the general text's perplexity, after: through the sharded model, in lockstep
    assert metrics[1]["perplexity_after"] == pytest.approx(metrics[0]["perplexity_after"], rel=1e-5)
    assert metrics[1]["perplexity_before"] == metrics[0]["perplexity_before"] != metrics[0]["perplexity_after"]
    assert one[0, 0] == one[1, 1] == 1.0 and one[1, 0] < 1  # each task learnt, the first forgotten: not two broken runs
    weights = [load_file(tmp_path / f"run{n}" / "model.safetensors") for n in (1, 2)]
    assert weights[0].keys() == weights[1].keys()
    lora = [k for k in weights[0] if "lora_" in k]
    assert len(lora) == 8
    for key, value in weights[0].items():
        torch.testing.assert_close(weights[1][key], value, rtol=0, atol=1e-5 if key in lora else 0)
    # rank 0's exports read the whole model: each task's adapter and the merged model, as one process writes them
    for name in ("adapters/task_0/adapter_model.safetensors", "adapters/task_1/adapter_model.safetensors", "merged/model.safetensors"):
        exported = [load_file(tmp_path / f"run{n}" / name) for n in (1, 2)]
        assert exported[0].keys() == exported[1].keys() and exported[0], name
        for key, value in exported[0].items():  # merged: W + (alpha / r = 4) B A, a rank-4 sum of the LoRA's 1e-5 differences
            atol = 1e-5 if "adapters" in name else 1e-4 if key.endswith(("q_proj.weight", "v_proj.weight")) else 0
            torch.testing.assert_close(exported[1][key], value, rtol=0, atol=atol, msg=f"{name} {key}")


@pytest.mark.slow
def test_each_runs_checkpoint_resumes_in_the_other(tiny_lm, distinct_tasks, tmp_path):
    """The sharded run's first checkpoint resumed in one process, the one-process run's with two sharded ones."""
    _, results = _one_and_two(tiny_lm, distinct_tasks, tmp_path)
    for nproc, other in ((1, 2), (2, 1)):
        run = tmp_path / f"run{other}"
        for lost in (run / "checkpoints").glob("exp_001.pt*"):
            lost.unlink()
        (run / "metrics.json").unlink()
        done = _run([str(run), "--resume"], nproc)
        assert done.returncode == 0, done.stderr[-3000:]
        assert "continuing at experience 1/2" in done.stdout
        assert json.loads((run / "metrics.json").read_text())["acc_matrix"] == results[other]["acc_matrix"]
