"""The classic class-incremental methods (iCaRL, SI, MAS) through the engine, on a trainable and a frozen MLP.

Tiny offline streams of scikit-learn digits. What each test shows could fail:

* **Orderings** against fine-tuning on the same stream and seed: iCaRL forgets less on a
  class-incremental stream (5 experiences x 2 classes); SI and MAS, which only regularise the
  weights, forget less on a domain-incremental one (digits rotated by 0, 60 and 120 degrees; on a
  class-incremental stream they stay near fine-tuning, as in every class-IL table since
  van de Ven & Tolias 2019). Both with the backbone trained and frozen (cached features, only
  the head learns).
* **iCaRL's defining property**: its predictions are the nearest mean of exemplars, recomputed
  here in numpy from the memory's samples and the final backbone, and so are the accuracies the
  engine recorded.
* **Resume**: a run stopped before its third experience and resumed from its checkpoints gives
  the accuracy matrix of an uninterrupted run, bitwise.

Equality with the official code is in ``tests/reference/test_classic_cil.py``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

CLASS_INCREMENTAL = {"name": "class_incremental", "dataset": "sklearn_digits", "n_experiences": 5,
                     "train_per_class": 30, "test_per_class": 10}
DOMAIN_INCREMENTAL = {"name": "domain_incremental", "dataset": "sklearn_digits", "train_per_class": 30,
                      "test_per_class": 10, "domains": [{"rotation": 0}, {"rotation": 60}, {"rotation": 120}]}
METHODS = {  # name -> (strategy section, stream it is compared on)
    "icarl_bce": ({"name": "icarl", "mem_size": 100}, CLASS_INCREMENTAL),
    "icarl_ce": ({"name": "icarl", "mem_size": 100, "loss": "ce"}, CLASS_INCREMENTAL),
    "si": ({"name": "si", "c": 10.0}, DOMAIN_INCREMENTAL),
    "mas": ({"name": "mas", "lambda_reg": 1.0}, DOMAIN_INCREMENTAL),
}
BACKBONES = {"trainable": False, "frozen": True}


@pytest.fixture(autouse=True)
def _cache_env(tmp_path, monkeypatch):
    monkeypatch.setenv("CLPEFT_CACHE", str(tmp_path / "cache"))


def _config(strategy: dict, scenario: dict, frozen: bool, root) -> dict:
    return {
        "seed": 0,
        "scenario": {**scenario, "root": str(root)},
        "backbone": {"name": "mlp", "hidden": [32], "freeze": frozen},
        "strategy": strategy,
        "train": {"epochs": 5, "batch_size": 16, "lr": 0.05, "optimizer": "sgd"},
        "eval": {"batch_size": 128, "baseline": False},
        "logging": {"tensorboard": False, "progress": "never"},
    }


@pytest.mark.parametrize("backbone", BACKBONES)
@pytest.mark.parametrize("method", METHODS)
def test_forgets_less_than_finetune(method, backbone, tmp_path, run_keeping):
    strategy, scenario = METHODS[method]
    frozen = BACKBONES[backbone]
    mine, trained, _ = run_keeping(_config(strategy, scenario, frozen, tmp_path / "data"), tmp_path / "method")
    finetune, _, _ = run_keeping(_config({"name": "finetune"}, scenario, frozen, tmp_path / "data"), tmp_path / "finetune")
    assert trained.uses_features == frozen
    assert mine["metrics"]["forgetting"] < finetune["metrics"]["forgetting"] - 0.15, (mine["metrics"], finetune["metrics"])


def _nme_predictions(features: np.ndarray, exemplar_features: np.ndarray, exemplar_labels: np.ndarray, n_classes: int):
    """iCaRL's Alg. 1 in numpy: the nearest unit-length mean of the normalised exemplar features."""
    def unit(x):
        return x / (np.linalg.norm(x, axis=1, keepdims=True) + 1e-8)

    means = np.stack([unit(exemplar_features[exemplar_labels == c]).mean(0) for c in range(n_classes)])
    means /= np.linalg.norm(means, axis=1, keepdims=True)
    return np.linalg.norm(unit(features)[:, None, :] - means[None], axis=2).argmin(1)


@pytest.mark.parametrize("backbone", BACKBONES)
def test_icarl_predicts_the_nearest_mean_of_exemplars(backbone, tmp_path, run_keeping):
    config = _config({"name": "icarl", "mem_size": 60}, CLASS_INCREMENTAL, BACKBONES[backbone], tmp_path / "data")
    result, strategy, stream = run_keeping(config, tmp_path / "run")
    assert len(strategy.memory) == 60 and torch.bincount(strategy.memory.labels).tolist() == [6] * 10
    x_memory, y_memory = strategy.memory.view(stream).load()
    with torch.no_grad():
        exemplars = strategy.backbone(x_memory).double().numpy()
        accuracies = []
        for exp in stream:
            x, y = exp.test.load()
            features = strategy.backbone(x)
            expected = _nme_predictions(features.double().numpy(), exemplars, y_memory.numpy(), 10)
            assert np.array_equal(strategy.means(features).argmax(1).numpy(), expected)
            accuracies.append(float((expected == y.numpy()).mean()))
    np.testing.assert_allclose(result["acc_matrix"][-1], accuracies, atol=1e-9)


@pytest.mark.parametrize("method", METHODS)
def test_resume_gives_the_same_matrix(method, tmp_path, interrupted_then_resumed):
    strategy, scenario = METHODS[method]
    config = _config(strategy, {**scenario, "train_per_class": 12}, False, tmp_path / "data")
    config["train"]["epochs"] = 2
    full, resumed = interrupted_then_resumed(config, tmp_path, at=2)
    assert resumed == full
