"""DUCT through the engine on sklearn's digits (class-incremental, as LAMDA-PILOT runs it) on a trainable MLP.

What each test checks could fail: that DUCT forgets less than fine-tuning, what each phase may and
may not change (every task trains from the pre-trained weights; the backbone after a task is the
pre-trained one plus the weighted task vectors, recomputed here from the recorded fine-tuned
weights and class means), the learning rates every SGD step ran at (PILOT's ConstantLR), the
one-line torchrun refusal, and that an interrupted run resumes to the same accuracy matrix.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from clpeft.errors import UserError

DIGITS = {"name": "class_incremental", "dataset": "sklearn_digits", "n_experiences": 5, "train_per_class": 30, "test_per_class": 10}
DUCT = {"name": "duct", "retrain_epochs": 6, "retrain_lr": 0.05}


@pytest.fixture(autouse=True)
def _cache_env(tmp_path, monkeypatch):
    monkeypatch.setenv("CLPEFT_CACHE", str(tmp_path / "cache"))


def _config(strategy: dict, root, epochs: int = 6) -> dict:
    return {
        "seed": 0,
        "scenario": {**DIGITS, "root": str(root)},
        "backbone": {"name": "mlp", "hidden": [32]},
        "strategy": strategy,
        "train": {"epochs": epochs, "batch_size": 16, "lr": 0.05, "optimizer": "sgd", "weight_decay": 0.0005},
        "eval": {"batch_size": 128, "baseline": False},
        "logging": {"tensorboard": False, "progress": "never"},
    }


def _parameters(module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in module.named_parameters()}


def test_duct_forgets_less_than_finetune_and_merges_task_vectors(tmp_path, run_keeping, monkeypatch):
    """Five tasks of two digits. Every task's training starts from the pre-trained backbone; after each
    task the backbone equals ``theta_0 + sum_k 0.25 cos_k (theta*_k - theta_0)``, with ``theta*_k``
    recorded at the end of task ``k``'s epochs and ``cos_k`` the mean cosine of the task's class
    means under ``theta_0`` and ``theta*_k``, both recomputed here from the training images. DUCT's
    final accuracy is above fine-tuning's by 0.1 and its forgetting below by 0.3 (fine-tuning a
    class-incremental stream forgets everything; PILOT's zero-started rows cost DUCT accuracy, see
    the next test)."""
    from clpeft.strategies.duct import DUCT as Strategy

    record = []
    before, after = Strategy.before_experience, Strategy.after_experience

    def spy_before(self, exp):
        before(self, exp)
        record.append({"start": _parameters(self.backbone)})

    def spy_after(self, exp):
        record[-1]["trained"] = _parameters(self.backbone)
        x, y = exp.train.load()
        classes = list(exp.classes_in_this_experience)
        with torch.no_grad():
            record[-1]["after_means"] = torch.stack([self.backbone(x[y == c]).double().mean(0) for c in classes])
        after(self, exp)
        record[-1]["merged"] = _parameters(self.backbone)
        record[-1]["x"], record[-1]["y"], record[-1]["classes"] = x, y, classes

    monkeypatch.setattr(Strategy, "before_experience", spy_before)
    monkeypatch.setattr(Strategy, "after_experience", spy_after)
    mine, strategy, _ = run_keeping(_config(DUCT, tmp_path / "data"), tmp_path / "duct")
    monkeypatch.undo()
    finetune, _, _ = run_keeping(_config({"name": "finetune"}, tmp_path / "data"), tmp_path / "finetune")

    pretrained = record[0]["start"]
    backbone = strategy.backbone
    expected = {name: torch.zeros_like(p) for name, p in pretrained.items()}
    for task in record:
        for name, p in task["start"].items():
            torch.testing.assert_close(p, pretrained[name], rtol=0, atol=0)
        with torch.no_grad():
            for name, p in backbone.named_parameters():
                p.copy_(pretrained[name])
            means_before = torch.stack([backbone(task["x"][task["y"] == c]).double().mean(0) for c in task["classes"]])
        cosine = F.cosine_similarity(means_before, task["after_means"], dim=1).mean().item()
        assert cosine < 0.9999  # the fine-tuning moved the features: the weight matters
        for name in expected:
            expected[name] += 0.25 * cosine * (task["trained"][name] - pretrained[name])
            torch.testing.assert_close(task["merged"][name], pretrained[name] + expected[name], rtol=1e-5, atol=1e-6)
    assert mine["metrics"]["acc_last"] > finetune["metrics"]["acc_last"] + 0.1, (mine["metrics"], finetune["metrics"])
    assert mine["metrics"]["forgetting"] < finetune["metrics"]["forgetting"] - 0.3, (mine["metrics"], finetune["metrics"])


def test_uniform_new_rows_learn_each_task_and_keep_more(tmp_path, run_keeping):
    """``new_rows: uniform``: each task's rows train and re-train normally, and the transport mixes
    rows of comparable norms. After five tasks, acc_last is at least 0.15 above PILOT's zero-started
    rows and 0.3 above fine-tuning's, and every row of the head has a norm below 100 (PILOT's:
    ~1e10 from the second task on)."""
    uniform, strategy, _ = run_keeping(_config({**DUCT, "new_rows": "uniform"}, tmp_path / "data"), tmp_path / "uniform")
    zero, pilot, _ = run_keeping(_config(DUCT, tmp_path / "data"), tmp_path / "zero")
    finetune, _, _ = run_keeping(_config({"name": "finetune"}, tmp_path / "data"), tmp_path / "finetune")
    assert uniform["metrics"]["acc_last"] > zero["metrics"]["acc_last"] + 0.15, (uniform["metrics"], zero["metrics"])
    assert uniform["metrics"]["acc_last"] > finetune["metrics"]["acc_last"] + 0.3, (uniform["metrics"], finetune["metrics"])
    assert strategy.head.weight.norm(dim=1).max() < 100 and pilot.head.weight[2:].norm(dim=1).min() > 1e8


def test_every_step_runs_at_pilots_constant_lr(tmp_path, run_keeping, monkeypatch):
    """Every SGD step's learning rates, recorded in ``step``: the engine's epochs run at
    ``lr / 3`` (head) and ``lr / 300`` (backbone) for epochs 0-4 and at ``lr``, ``lr / 100`` from
    epoch 5 (train.epochs 6); each re-training at ``retrain_lr / 3`` for its epochs 0-4 and
    ``retrain_lr`` for epoch 5. Five tasks of 2 x 30 samples: 4 steps per epoch."""
    seen = []
    step = torch.optim.SGD.step

    def spy(self, *args, **kwargs):
        seen.append([group["lr"] for group in self.param_groups])
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.SGD, "step", spy)
    run_keeping(_config(DUCT, tmp_path / "data"), tmp_path / "run")
    lr, retrain = 0.05, 0.05
    engine = [[lr * 0.01 / 3, lr / 3]] * 20 + [[lr * 0.01, lr]] * 4
    head = [[retrain / 3]] * 20 + [[retrain]] * 4
    assert len(seen) == 5 * (24 + 24)
    for got, want in zip(seen, 5 * (engine + head), strict=True):
        assert got == pytest.approx(want, rel=1e-12)


def test_duct_refuses_torchrun_in_one_line(monkeypatch):
    from clpeft.backbones.mlp import MLPBackbone
    from clpeft.strategies.duct import DUCT as Strategy

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UserError, match="duct runs in one process: its head re-training"):
        Strategy(MLPBackbone((64,), hidden=[8]))


def test_duct_interrupted_run_resumes_to_the_same_matrix(tmp_path, interrupted_then_resumed):
    full, resumed = interrupted_then_resumed(_config({"name": "duct", "retrain_epochs": 2}, tmp_path / "data", epochs=2), tmp_path)
    assert resumed == full
