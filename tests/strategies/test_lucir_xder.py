"""LUCIR and X-DER through the engine, on small offline streams of scikit-learn digits.

Step-by-step equality with Mammoth is ``tests/reference/test_mammoth_lucir_xder.py``; here:

* each forgets less than fine-tuning on the same class-incremental stream (5 experiences x 2
  classes), with a trainable MLP and on a frozen backbone's cached features;
* X-DER's memory ends class-balanced (``mem_size // classes`` per class) with logits of every
  class for every sample (the old samples' were filled in for the classes learnt after them);
  LUCIR's cosine scale ``sigma`` was learnt;
* a run interrupted and resumed gives the uninterrupted run's accuracy matrix (memories, logits,
  cosine head and scale travel in the checkpoint);
* under ``torchrun`` both refuse in one line with the reason (X-DER's memories would differ between
  ranks; LUCIR's margin ranking loss averages over a rank's old-class samples, so two processes
  would not train as one: seen in a two-process run, whose matrix differed).
"""

from __future__ import annotations

import pytest
import torch

from clpeft.backbones.mlp import MLPBackbone
from clpeft.errors import UserError
from clpeft.strategies.lucir import LUCIR
from clpeft.strategies.x_der import XDER

BACKBONES = {"trainable": {"name": "mlp", "hidden": [64]}, "frozen": {"name": "mlp", "hidden": [64], "freeze": True}}
METHODS = {"lucir": {"name": "lucir", "mem_size": 100, "finetune_epochs": 5}, "x_der": {"name": "x_der", "mem_size": 100}}


def _config(tmp_path, strategy: dict, backbone: dict, epochs: int = 4) -> dict:
    return {
        "seed": 0,
        "scenario": {
            "name": "class_incremental",
            "dataset": "sklearn_digits",
            "n_experiences": 5,
            "train_per_class": 60,
            "test_per_class": 20,
            "root": str(tmp_path / "data"),
        },
        "backbone": backbone,
        "strategy": strategy,
        "train": {"epochs": epochs, "batch_size": 16, "lr": 0.05, "feature_cache": "memory"},
        "eval": {"baseline": False},
        "logging": {"tensorboard": False, "progress": "never"},
    }


@pytest.fixture(scope="module")
def finetune_metrics(tmp_path_factory):
    import clpeft.config
    import clpeft.engine

    out = {}
    for key, backbone in BACKBONES.items():
        path = tmp_path_factory.mktemp(key)
        cfg = clpeft.config.resolve(_config(path, {"name": "finetune"}, backbone))
        out[key] = clpeft.engine.Engine(cfg, path / "run", device="cpu").run()["metrics"]
    return out


@pytest.mark.parametrize("backbone", list(BACKBONES))
@pytest.mark.parametrize("method", list(METHODS))
def test_forgets_less_than_finetune(tmp_path, run_keeping, finetune_metrics, method, backbone):
    result, strategy, _ = run_keeping(_config(tmp_path, METHODS[method], BACKBONES[backbone]), tmp_path / "run")
    mine, finetune = result["metrics"], finetune_metrics[backbone]
    assert strategy.uses_features == (backbone == "frozen")
    assert finetune["forgetting"] > 0.9
    assert mine["forgetting"] < finetune["forgetting"] - 0.5, (mine, finetune)
    assert mine["acc_final"] > finetune["acc_final"] + 0.4, (mine, finetune)
    if method == "x_der":
        assert torch.bincount(strategy.memory.labels).tolist() == [10] * 10
        _, mask = strategy.memory.logits.read(torch.arange(100))
        assert mask.all()  # every sample has every class's logit, those stored in experience 0 included
    else:
        assert float(strategy.head.scale.detach()) > 1.5  # sigma learnt from its initial 1


@pytest.mark.parametrize("method", list(METHODS))
def test_interrupted_and_resumed_run_gives_the_same_matrix(tmp_path, interrupted_then_resumed, method):
    cfg = _config(tmp_path, {**METHODS[method], "mem_size": 40}, {"name": "mlp", "hidden": [32]}, epochs=2)
    full, resumed = interrupted_then_resumed(cfg, tmp_path, at=3)
    assert resumed == full


@pytest.mark.parametrize("cls, reason", [(XDER, "rewrite the memory's logits"), (LUCIR, "margin ranking loss")])
def test_refuses_torchrun_in_one_line(monkeypatch, cls, reason):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(UserError) as refused:
        cls(MLPBackbone(input_shape=(4,), hidden=[4]))
    message = str(refused.value)
    assert message.startswith(f"strategy.name: {cls.registered_name} runs in one process") and reason in message
    assert "without torchrun" in message and "\n" not in message and refused.value.exit_code == 2
    monkeypatch.setenv("WORLD_SIZE", "1")
    cls(MLPBackbone(input_shape=(4,), hidden=[4]))
