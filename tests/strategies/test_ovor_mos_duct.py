"""OVOR, MOS and DUCT through the engine on sklearn's digits with a tiny random ViT on the CPU.

What each test checks could fail: that a method learns each task, what its phases may and may not
change, values recomputed independently of the strategy's code, and that an interrupted run
resumes to the same accuracy matrix.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from clpeft.components.heads.virtual_outliers import energy_margin_loss

VIT = {"name": "timm", "model": "test_vit", "img_size": 32, "freeze": True}


def _config(tmp_path, strategy: dict, epochs: int, n_experiences: int = 5, per_class: int = 20, lr: float = 0.003) -> dict:
    return {
        "seed": 0,
        "scenario": {
            "name": "class_incremental",
            "dataset": "sklearn_digits",
            "n_experiences": n_experiences,
            "train_per_class": per_class,
            "test_per_class": 20,
            "root": str(tmp_path / "data"),
        },
        "backbone": VIT,
        "strategy": strategy,
        "train": {"epochs": epochs, "batch_size": 16, "lr": lr, "optimizer": "adam", "schedule": "quarter_cosine"},
        "eval": {"batch_size": 256, "baseline": False},
        "logging": {"tensorboard": False, "progress": "never", "keep_checkpoints": 5},
    }


# ---------------------------------------------------------------------------------- OVOR

OVOR = {"name": "ovor", "g_length": 2, "e_length": 4, "neighbours": 10, "offsets": 100, "boundary_points": 10, "outliers_per_class": 20}
OVOR |= {"id_energy_threshold": -4.0, "outlier_energy_threshold": -1.0, "outlier_weight": 1.0}


@pytest.mark.slow  # about 10 s
def test_ovor_outlier_epochs_train_only_the_head_and_lower_the_energy_margin(tmp_path, run_keeping):
    """In every experience the outlier epochs (after ``regular_epochs``) leave the prompts bitwise as
    the regular epochs left them, move the head, and lower the energy margin of eq. 5 recomputed on
    the epoch's own features and outliers (ID energy below ``tau_id``, outlier energy above
    ``tau_ood``); the regular epochs move the prompts. Every task's classes are learnt and kept apart
    to the end (accuracy among each task's own classes above 0.6, mean above 0.75; chance 0.5), and
    the final accuracy over all ten classes is above 0.2 (chance 0.1)."""
    from clpeft.strategies.ovor import OVOR as OVORStrategy

    seen: list[dict] = []
    original = OVORStrategy.before_epoch

    def spy(self, exp, epoch):
        if epoch in (0, self.regular_epochs):
            seen.append({"epoch": epoch, "prompt": [p.detach().clone() for p in self.prompt.parameters()]})
        original(self, exp, epoch)
        if epoch == self.regular_epochs:
            features, labels = self._features
            classes = list(exp.classes_in_this_experience)
            seen[-1] |= {"features": features, "outliers": self._outliers.outliers, "classes": classes}
            seen[-1]["margin"] = self._margin(features, self._outliers.outliers, classes)

    def margin(self, features, outliers, classes):
        with torch.no_grad():
            return energy_margin_loss(self.head(features)[:, classes], self.head(outliers)[:, classes], -4.0, -1.0).item()

    OVORStrategy.before_epoch, OVORStrategy._margin = spy, margin
    try:
        result, strategy, stream = run_keeping(_config(tmp_path, {**OVOR, "regular_epochs": 4}, epochs=6, lr=0.03), tmp_path / "run")
        final_prompt = [p.detach() for p in strategy.prompt.parameters()]
        last = seen[-1]
        after = strategy._margin(last["features"], last["outliers"], last["classes"])
    finally:
        OVORStrategy.before_epoch = original
        del OVORStrategy._margin
    assert [s["epoch"] for s in seen] == [0, 4] * 5
    for start, regularised in zip(seen[::2], seen[1::2]):
        assert not all(torch.equal(a, b) for a, b in zip(start["prompt"], regularised["prompt"]))
    assert all(torch.equal(a, b) for a, b in zip(seen[-1]["prompt"], final_prompt))
    assert last["margin"] > 0.1 and after < 0.8 * last["margin"], (last["margin"], after)
    within = []
    with torch.no_grad():
        for exp in stream:
            x, y = exp.test.load(torch.arange(len(exp.test)))
            classes = torch.tensor(exp.classes_in_this_experience)
            within.append(float((classes[strategy.predict(x)[:, classes].argmax(1)] == y).float().mean()))
    assert min(within) > 0.6 and np.mean(within) > 0.75 and result["metrics"]["acc_last"] > 0.2, (within, result["metrics"])


def test_ovor_warns_when_no_outlier_epoch_runs(tmp_path, run_keeping):
    """``train.epochs`` not above ``regular_epochs``: every experience ends with a warning naming both keys."""
    with pytest.warns(UserWarning, match="strategy.regular_epochs") as caught:
        run_keeping(_config(tmp_path, {**OVOR, "regular_epochs": 2}, epochs=2, n_experiences=2, per_class=4), tmp_path / "run")
    assert sum("no outlier epoch ran" in str(w.message) for w in caught) == 2


def test_ovor_interrupted_run_resumes_to_the_same_matrix(tmp_path, interrupted_then_resumed):
    """The prompt and head are restored from the checkpoint; the outlier epochs draw from the engine's seeds."""
    full, resumed = interrupted_then_resumed(_config(tmp_path, {**OVOR, "regular_epochs": 1}, epochs=2, per_class=10), tmp_path)
    assert resumed == full


# ---------------------------------------------------------------------------------- MOS

MOS = {"name": "mos", "adapter_bottleneck": 8, "align_epochs": 5, "align_samples": 32}


def _mos_config(tmp_path, epochs: int = 3, per_class: int = 20) -> dict:
    config = _config(tmp_path, MOS, epochs=epochs, per_class=per_class, lr=0.05)
    config["train"] |= {"optimizer": "sgd", "momentum": 0.9, "weight_decay": 0.0005, "schedule": "cosine_epoch"}
    return config


def test_mos_merges_every_step_keeps_old_adapters_and_predicts_by_retrieval(tmp_path, run_keeping):
    """After five tasks: the adapters of tasks 0..3 are bitwise what they were when frozen; every step of
    a later task left its adapter at ``(1 - beta) theta + beta * mean(earlier)`` (checked on the
    last step of task 4, recomputed from the adapter before the merge); the prototypes are the class
    means of the first adapter's features; predictions are the ensemble of the refined head logits and
    the first guess, recomputed here adapter by adapter; the stream is learnt (accuracy over all ten
    classes above 0.35, chance 0.1)."""
    from clpeft.strategies.mos import MOS as MOSStrategy

    frozen, merges = [], []
    original_after, original_step = MOSStrategy.after_experience, MOSStrategy.after_training_step

    def after_experience(self, exp):
        original_after(self, exp)
        frozen.append(self.banks[0].down_weight.clone())

    def after_training_step(self):
        before = self.banks[0].current.down_proj.weight.detach().clone()
        result = original_step(self)
        merges.append((before, self.banks[0].current.down_proj.weight.detach().clone(), self.banks[0].down_weight.clone()))
        return result

    MOSStrategy.after_experience, MOSStrategy.after_training_step = after_experience, after_training_step
    try:
        result, strategy, stream = run_keeping(_mos_config(tmp_path), tmp_path / "run")
    finally:
        MOSStrategy.after_experience, MOSStrategy.after_training_step = original_after, original_step
    assert all(torch.equal(f, frozen[-1][: len(f)]) for f in frozen)
    before, after, stack = merges[-1]
    torch.testing.assert_close(after, 0.9 * before + 0.1 * stack.mean(0), rtol=0, atol=1e-6)
    x, _ = (torch.cat(part) for part in zip(*(exp.test.load(torch.arange(len(exp.test))) for exp in stream), strict=True))
    with torch.no_grad():
        features = strategy.every_feature(x)
        for k in range(5):  # the batched pass equals one adapter at a time
            with _only_adapter(strategy, k):
                torch.testing.assert_close(features[:, k], strategy.adapted(x), rtol=1e-4, atol=1e-5)
        first = torch.nn.functional.normalize(features[:, 0], dim=1) @ torch.nn.functional.normalize(strategy.prototypes, dim=1).T
        expected = torch.softmax(strategy.head(features[torch.arange(len(x)), _refined_task(strategy, features, first)]), 1)
        expected = expected + torch.softmax(5 * first, 1)
        torch.testing.assert_close(strategy.predict(x), expected, rtol=1e-5, atol=1e-6)
    assert result["metrics"]["acc_last"] > 0.35, result["metrics"]


def _refined_task(strategy, features: torch.Tensor, first: torch.Tensor) -> torch.Tensor:
    """PILOT's loop, sample by sample: evaluate at the current adapter, stop when the predicted task stays or after 4."""
    task_of_class = torch.arange(10) // 2
    out = []
    for i in range(len(features)):
        current = int(task_of_class[first[i].argmax()])
        for evaluation in range(1, 5):
            predicted = int(task_of_class[strategy.head(features[i, current]).argmax()])
            if evaluation == 4 or predicted == current:
                break
            current = predicted
        out.append(current)
    return torch.tensor(out)


class _only_adapter:
    """Every bank applies frozen adapter ``k`` alone (a plain forward of one adapter set)."""

    def __init__(self, strategy, k: int):
        self.banks, self.k = strategy.banks, k

    def __enter__(self):
        from clpeft.components.lora.parallel_adapter import Adapter

        for bank in self.banks:
            adapter = Adapter(bank.dim, bank.bottleneck, bank.scale, 0.0)
            adapter.load_state_dict(
                {"down_proj.weight": bank.down_weight[self.k], "down_proj.bias": bank.down_bias[self.k]}
                | {"up_proj.weight": bank.up_weight[self.k], "up_proj.bias": bank.up_bias[self.k]}
            )
            bank.current = adapter.eval()

    def __exit__(self, *exc):
        for bank in self.banks:
            bank.current = None


def test_mos_interrupted_run_resumes_to_the_same_matrix(tmp_path, interrupted_then_resumed):
    """The frozen adapter stacks (the next task starts from the last), prototypes, class statistics and
    the aligned head are restored from the checkpoint."""
    full, resumed = interrupted_then_resumed(_mos_config(tmp_path, epochs=1, per_class=10), tmp_path)
    assert resumed == full
