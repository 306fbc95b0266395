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


def test_ovor_interrupted_run_resumes_to_the_same_matrix(tmp_path, interrupted_then_resumed):
    """The prompt and head are restored from the checkpoint; the outlier epochs draw from the engine's seeds."""
    full, resumed = interrupted_then_resumed(_config(tmp_path, {**OVOR, "regular_epochs": 1}, epochs=2, per_class=10), tmp_path)
    assert resumed == full
