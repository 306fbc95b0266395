"""HiDe-LoRA through the engine, on a tiny random-init timm ViT and sklearn digits.

The ViT is timm's ``test_vit`` (6 blocks, width 64) at 32 px. Backbone passes are counted with the
wrapper's pass counter (the official code: two per training step and per test batch, one per step
of its separate TII run); the LoRA forward, the loss, the copy-forward and the LoRA momentum are
recomputed by hand; a mixed batch equals its samples run task by task; resume and state round-trips
are exact.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import clpeft.config
import clpeft.engine
from clpeft.backbones.timm_backbone import TimmBackbone
from clpeft.data import Batch
from clpeft.errors import UserError
from clpeft.experience import Experience
from clpeft.strategies.hide_lora import HiDeLoRA

PARAMS = {
    "pool_size": 5,
    "rank": 2,
    "lora_layers": [0, 1],
    "n_centroids": 3,
    "tap_epochs": 5,
    "tap_samples": 16,
    "tii_epochs": 20,
    "tii_lr": 0.01,
    "tii_batch_size": 8,
    "tii_tap_lr": 0.01,
    "tii_tap_samples": 8,
}
BATCH, EPOCHS, PER_CLASS = 8, 2, 16


def _config(tmp_path, strategy: dict | None = None) -> dict:
    return {
        "seed": 0,
        "scenario": {
            "name": "class_incremental",
            "dataset": "sklearn_digits",
            "n_experiences": 5,
            "train_per_class": PER_CLASS,
            "test_per_class": 8,
            "root": str(tmp_path / "data"),
        },
        "backbone": {"name": "timm", "model": "test_vit", "img_size": 32, "freeze": True},
        "strategy": strategy or {"name": "hide_lora", **PARAMS},
        "train": {"epochs": EPOCHS, "batch_size": BATCH, "lr": 0.01, "optimizer": "adam", "feature_cache": "memory"},
        "eval": {"batch_size": 64, "baseline": False},
        "logging": {"tensorboard": False, "progress": "never"},
    }


def _engine(tmp_path, **kw):
    engine = clpeft.engine.Engine(clpeft.config.resolve(_config(tmp_path, **kw)), tmp_path / "run", device="cpu")
    built = engine.build()
    return engine, built, built.strategy


def _backbone(seed: int = 0) -> TimmBackbone:
    torch.manual_seed(seed)
    return TimmBackbone((1, 8, 8), model="test_vit", img_size=32, freeze=True)


def _digits(n: int = 12) -> torch.Tensor:
    from sklearn.datasets import load_digits

    images = load_digits().images[:n] * (255.0 / 16.0)
    return torch.from_numpy(np.rint(images).astype(np.uint8)).unsqueeze(1)


def _factors(strategy: HiDeLoRA) -> list[torch.Tensor]:
    return [p.detach().clone() for p in strategy.task_lora.parameters()]


def _started(strategy: HiDeLoRA, n_tasks: int) -> None:
    for t in range(n_tasks):
        strategy.before_experience(Experience(t, None, None, [2 * t, 2 * t + 1], list(range(2 * t + 2))))


@pytest.mark.slow
def test_learns_digits_with_one_backbone_pass_per_step_and_none_for_task_inference(tmp_path):
    """Five experiences of two digits: one LoRA pass per training step (the official code: two), none in TII
    training (the cached frozen features), one per test batch whatever mix of tasks TII assigns; the frozen weights
    unchanged bitwise; a task's LoRA starts as the previous one's and is fixed once its task ends; the model frozen
    between tasks; well above chance on every experience."""
    engine, built, strategy = _engine(tmp_path)
    frozen_before = {k: v.clone() for k, v in strategy.backbone.state_dict().items() if "lora_" not in k}
    in_step, tii_batches, in_predict, started, finished, frozen_between = [], [], [], [], [], []
    step, fit, before, after, predict = (
        strategy.training_step,
        strategy.task_identity.fit,
        strategy.before_experience,
        strategy.after_experience,
        strategy.predict,
    )

    def counted(calls, fn):
        def wrapped(*args, **kwargs):
            before_calls = passes.calls
            out = fn(*args, **kwargs)
            calls.append(passes.calls - before_calls)
            return out

        return wrapped

    def start(exp):
        before(exp)
        started.append(_factors(strategy))

    def finish(exp):
        after(exp)
        finished.append(_factors(strategy))
        frozen_between.append(strategy.backbone.frozen)

    strategy.training_step, strategy.task_identity.fit = counted(in_step, step), counted(tii_batches, fit)
    strategy.before_experience, strategy.after_experience, strategy.predict = start, finish, counted(in_predict, predict)
    with strategy.backbone.count_passes() as passes:
        result = engine.run(built)
    assert len(in_step) == 5 * EPOCHS * -(-2 * PER_CLASS // BATCH) and set(in_step) == {1}
    assert tii_batches == [0] * 5  # TII's epochs read the cached frozen features: no backbone pass at all
    assert in_predict and set(in_predict) == {1}
    assert all(frozen_between) and strategy.backbone.frozen
    after_state = strategy.backbone.state_dict()
    assert all(torch.equal(v, after_state[k]) for k, v in frozen_before.items())
    for t in range(1, 5):  # copy-forward: task t starts from task t - 1's finished LoRA
        assert all(torch.equal(p[t], q[t - 1]) for p, q in zip(started[t], finished[t - 1]))
    for t in range(5):  # a LoRA is final once its task ends
        assert all(torch.equal(p[t], q[t]) for p, q in zip(finished[-1], finished[t]))
    assert not all(torch.equal(p[1], p[0]) for p in finished[-1])
    final_row = np.asarray(result["acc_matrix"])[-1]
    assert result["metrics"]["acc_final"] > 0.35  # chance 0.1
    assert final_row.min() > 0.2  # every old experience still recognised (the task LoRAs and TAP; finetune: 0)


def test_lora_forward_loss_and_momentum_recomputed_by_hand():
    """The adapted key/value projections are ``W x + (alpha / r) B_t A_t x`` (the query's untouched); the training
    loss is the masked cross-entropy plus lambda times the contrastive term over [centroids; features] at
    temperature 0.8 (numpy); a new task starts from the previous LoRA and ends as (1 - m) theta_t + m mean(theta_<t)."""
    strategy = HiDeLoRA(_backbone(), **{**PARAMS, "alpha": 3.0, "lora_momentum": 0.25, "contrastive_weight": 0.5})
    _started(strategy, 2)
    layer = strategy.task_lora.layers["blocks.1.attn.qkv.v"]
    with torch.no_grad():
        for p in strategy.task_lora.parameters():
            p.normal_()
    qkv = strategy.backbone.net.blocks[1].attn.qkv
    x = torch.randn(3, 5, 64)
    with torch.no_grad(), strategy.task_lora.routed(torch.tensor([1, 0, 1])):
        out = qkv(x)
    a, b = layer.lora_A, layer.lora_B
    for i, t in enumerate([1, 0, 1]):
        base = layer.base_layer(x[i])
        torch.testing.assert_close(out[i, :, 128:], base + 1.5 * x[i] @ a[t].T @ b[t].T, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out[i, :, :64], qkv.q(x[i]))
    assert torch.equal(qkv(x)[..., 128:], layer.base_layer(x))  # outside routing: the frozen layer

    x = _digits(6)
    features = strategy.backbone(x)
    strategy.statistics.add(features, torch.tensor([0, 0, 0, 1, 1, 1]), [0, 1], 0, np.random.RandomState(0))
    strategy.before_experience(Experience(1, None, None, [2, 3], [0, 1, 2, 3]))
    y = torch.tensor([2, 3, 3, 2, 2, 3])
    loss = strategy.training_step(Batch(x, y, features))
    with torch.no_grad():
        h = strategy.features(x, 1).double().numpy()
        z = strategy.head(torch.from_numpy(h).float()).double().numpy()[:, 2:4]
    ce = np.mean(np.log(np.exp(z).sum(1)) - z[np.arange(6), y.numpy() - 2])
    rows = np.concatenate([strategy.statistics.centroids().numpy(), h])
    sim = rows @ rows.T / 0.8
    contrastive = np.mean(np.log(np.exp(sim - sim.max(1, keepdims=True)).sum(1)) + sim.max(1) - np.diag(sim))
    assert loss.item() == pytest.approx(ce + 0.5 * contrastive, rel=1e-5)

    before = _factors(strategy)
    strategy.before_experience(Experience(2, None, None, [4, 5], list(range(6))))
    assert all(torch.equal(p[2], q[1]) for p, q in zip(_factors(strategy), before))
    with torch.no_grad():
        for p in strategy.task_lora.parameters():
            p[2].add_(1.0)
    trained = _factors(strategy)
    strategy.task_lora.consolidate(2, 0.25)
    for p, q in zip(_factors(strategy), trained):
        torch.testing.assert_close(p[2], 0.75 * q[2] + 0.25 * (q[0] + q[1]) / 2, atol=1e-6, rtol=0)
        assert torch.equal(p[:2], q[:2])


def test_a_mixed_batch_equals_its_samples_task_by_task_in_one_pass():
    """Samples assigned different tasks by TII get their own task's LoRA in one backbone pass: the logits equal
    each sample run alone with its task's LoRA."""
    strategy = HiDeLoRA(_backbone(), **PARAMS)
    _started(strategy, 3)
    with torch.no_grad():
        for p in strategy.task_lora.parameters():
            p.normal_(std=0.3)
    strategy.eval()
    x = _digits(6)
    tasks = torch.tensor([2, 0, 1, 1, 0, 2])
    strategy.task_identity.infer = lambda query: tasks
    with torch.no_grad(), strategy.backbone.count_passes() as passes:
        logits = strategy.predict(x, strategy.backbone(x))
    assert passes.calls == 2  # the query (here computed, in a run cached) and one pass for the mixed batch
    with torch.no_grad():
        alone = torch.cat([strategy.head(strategy.features(x[i : i + 1], int(t))) for i, t in enumerate(tasks)])
    torch.testing.assert_close(logits, alone, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(logits, strategy.head(strategy.features(x, 0)), atol=1e-3)


def test_state_dict_round_trip_gives_identical_predictions(tmp_path):
    engine, built, strategy = _engine(tmp_path)
    engine.run(built)
    fresh = HiDeLoRA(_backbone(seed=123), **PARAMS)
    fresh.load_state_dict(copy.deepcopy(strategy.state_dict()))
    fresh.eval()
    x = _digits(12)
    with torch.no_grad():
        expected = strategy.predict(x)
        assert expected.shape == (12, 10)
        assert torch.equal(fresh.predict(x), expected)
    assert torch.equal(fresh.statistics.centroids(), strategy.statistics.centroids())


def test_interrupted_run_resumes_to_the_same_matrix(tmp_path, interrupted_then_resumed):
    full, resumed = interrupted_then_resumed(_config(tmp_path), tmp_path)
    assert resumed == full


def test_refuses_what_it_cannot_run(tmp_path, monkeypatch):
    """torchrun (its own optimizer loops after each experience), a backbone without blocks, missing blocks, more
    experiences than LoRAs."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UserError, match="without torchrun"):
        HiDeLoRA(_backbone(), **PARAMS)
    monkeypatch.delenv("WORLD_SIZE")
    from clpeft.backbones.mlp import MLPBackbone

    with pytest.raises(UserError, match="vision transformer"):
        HiDeLoRA(MLPBackbone((1, 8, 8), hidden=[16]), **PARAMS)
    with pytest.raises(UserError, match="lora_layers"):
        HiDeLoRA(_backbone(), **{**PARAMS, "lora_layers": [0, 9]})
    strategy = HiDeLoRA(_backbone(), **{**PARAMS, "pool_size": 1})
    strategy.before_experience(Experience(0, None, None, [0, 1], [0, 1]))
    with pytest.raises(UserError, match="pool_size"):
        strategy.before_experience(Experience(1, None, None, [2, 3], [0, 1, 2, 3]))
