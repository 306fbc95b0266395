"""HiDe-Prompt through the engine, on a tiny random-init timm ViT and sklearn digits.

The ViT is timm's ``test_vit`` (6 blocks, width 64) at 32 px. Backbone passes are counted with the
wrapper's pass counter (the official code: two per training step and per test batch, one per step
of its separate TII run); the TII task ids, the contrastive loss and the prompt momentum are
recomputed by hand; resume and state round-trips are exact.
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
from clpeft.strategies.hide_prompt import HiDePrompt

PARAMS = {
    "pool_size": 5,
    "prompt_length": 2,
    "prompt_layers": [0, 1],
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


def _config(tmp_path, strategy: dict | None = None, feature_cache: str = "memory") -> dict:
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
        "strategy": strategy or {"name": "hide_prompt", **PARAMS},
        "train": {"epochs": EPOCHS, "batch_size": BATCH, "lr": 0.01, "optimizer": "adam", "feature_cache": feature_cache},
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


@pytest.mark.slow
def test_learns_digits_with_one_backbone_pass_per_step_and_none_for_task_inference(tmp_path):
    """Five experiences of two digits: one prompted pass per training step (the official code: two), none in TII
    training (the cached frozen feature; official: one per step of its own run); the frozen
    backbone unchanged bitwise; the prompts of past tasks fixed once trained; well above chance on every experience."""
    engine, built, strategy = _engine(tmp_path)
    backbone_before = copy.deepcopy(strategy.backbone.state_dict())
    in_step, tii_batches, snapshots = [], [], []
    step, fit, after = strategy.training_step, strategy.task_identity.fit, strategy.after_experience

    def counted_step(batch):
        before = passes.calls
        loss = step(batch)
        in_step.append(passes.calls - before)
        return loss

    def counted_fit(*args, **kwargs):
        before = passes.calls
        losses = fit(*args, **kwargs)
        tii_batches.append(passes.calls - before)
        return losses

    def snapshot(exp):
        after(exp)
        snapshots.append(strategy.prompt_tasks.prompts.detach().clone())

    strategy.training_step, strategy.task_identity.fit, strategy.after_experience = counted_step, counted_fit, snapshot
    with strategy.backbone.count_passes() as passes:
        result = engine.run(built)
    assert len(in_step) == 5 * EPOCHS * -(-2 * PER_CLASS // BATCH) and set(in_step) == {1}
    assert tii_batches == [0] * 5  # TII's epochs read the cached frozen features: no backbone pass at all
    after_state = strategy.backbone.state_dict()
    assert all(torch.equal(v, after_state[k]) for k, v in backbone_before.items())
    for t in range(4):  # a prompt is final once its task ends (the next task starts from a copy)
        assert torch.equal(snapshots[-1][t], snapshots[t][t])
    assert not torch.equal(snapshots[1][1], snapshots[0][0])
    final_row = np.asarray(result["acc_matrix"])[-1]
    assert result["metrics"]["acc_final"] > 0.35  # chance 0.1 (0.425 at seed 0)
    assert final_row.min() > 0.2  # every old experience still recognised (the task prompts and TAP; finetune: 0)


def test_task_identity_and_the_loss_recomputed_by_hand():
    """Task ids are the task of TII's argmax class; the training loss is the masked cross-entropy plus lambda times
    the contrastive term over [centroids; features] at temperature 0.8 (numpy); the training prompt of a later task
    is (1 - m) e_t + m mean(e_<t), and the stored prompt becomes that mixture after the task."""
    strategy = HiDePrompt(_backbone(), **{**PARAMS, "prompt_momentum": 0.25, "contrastive_weight": 0.5})
    for t, classes in enumerate(([0, 1], [2, 3])):
        strategy.before_experience(Experience(t, None, None, classes, list(range(2 * t + 2))))
    stats = strategy.statistics
    x = _digits(6)
    features = strategy.backbone(x)
    rng = np.random.RandomState(0)
    stats.add(features, torch.tensor([0, 0, 0, 1, 1, 1]), [0, 1], 0, rng)
    strategy.task_identity.statistics.add(features, torch.tensor([0, 0, 0, 1, 1, 1]), [0, 1], 0, rng)
    strategy.task_identity.statistics.add(features, torch.tensor([2, 2, 2, 3, 3, 3]), [2, 3], 1, rng)
    with torch.no_grad():
        logits = strategy.task_identity(features).numpy()
    assert strategy.task_identity.infer(features).tolist() == [int(c >= 2) for c in logits.argmax(1)]

    p = strategy.prompt_tasks.prompts.detach().clone()
    mixed = 0.75 * p[1] + 0.25 * p[0]
    y = torch.tensor([2, 3, 3, 2, 2, 3])
    strategy.before_experience(Experience(1, None, None, [2, 3], [0, 1, 2, 3]))
    loss = strategy.training_step(Batch(x, y, features))
    with torch.no_grad():
        h = strategy.backbone.forward_prompted(x, prefixes={layer: (m[0], m[1]) for layer, m in zip([0, 1], mixed)}).double().numpy()
        z = strategy.head(torch.from_numpy(h).float()).double().numpy()[:, 2:4]
    ce = np.mean(np.log(np.exp(z).sum(1)) - z[np.arange(6), y.numpy() - 2])
    rows = np.concatenate([stats.centroids().numpy(), h])
    sim = rows @ rows.T / 0.8
    contrastive = np.mean(np.log(np.exp(sim - sim.max(1, keepdims=True)).sum(1)) + sim.max(1) - np.diag(sim))
    assert loss.item() == pytest.approx(ce + 0.5 * contrastive, rel=1e-5)
    strategy.prompt_tasks.consolidate(1, 0.25)
    torch.testing.assert_close(strategy.prompt_tasks.prompts[1], mixed, atol=1e-7, rtol=0)


def test_state_dict_round_trip_gives_identical_predictions(tmp_path):
    engine, built, strategy = _engine(tmp_path)
    engine.run(built)
    fresh = HiDePrompt(_backbone(seed=123), **PARAMS)
    fresh.load_state_dict(copy.deepcopy(strategy.state_dict()))
    fresh.eval()
    x = _digits(12)
    with torch.no_grad():
        expected = strategy.predict(x)
        assert expected.shape == (12, 10)
        assert torch.equal(fresh.predict(x), expected)
        assert torch.equal(fresh.task_identity.infer(fresh.backbone(x)), strategy.task_identity.infer(strategy.backbone(x)))
    assert torch.equal(fresh.statistics.centroids(), strategy.statistics.centroids())


def test_interrupted_run_resumes_to_the_same_matrix(tmp_path, interrupted_then_resumed):
    full, resumed = interrupted_then_resumed(_config(tmp_path), tmp_path)
    assert resumed == full


def test_refuses_what_it_cannot_run(tmp_path, monkeypatch):
    """torchrun (its own optimizer loops after each experience), more experiences than prompts, missing layers."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UserError, match="without torchrun"):
        HiDePrompt(_backbone(), **PARAMS)
    monkeypatch.delenv("WORLD_SIZE")
    with pytest.raises(UserError, match="prompt_layers"):
        HiDePrompt(_backbone(), **{**PARAMS, "prompt_layers": [0, 9]})
    strategy = HiDePrompt(_backbone(), **{**PARAMS, "pool_size": 1})
    strategy.before_experience(Experience(0, None, None, [0, 1], [0, 1]))
    with pytest.raises(UserError, match="pool_size"):
        strategy.before_experience(Experience(1, None, None, [2, 3], [0, 1, 2, 3]))
