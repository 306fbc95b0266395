"""A run on every device this machine has gives the CPU's results: the CPU always, CUDA where
present (``benchmarks/device_checks.sh`` runs this file on a lent GPU machine).

CUDA runs differ from the CPU's by float reordering (and bf16 rounding under autocast), so the
accuracy matrices are compared within a tolerance, not bit for bit.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from clpeft import config
from clpeft.engine import Engine

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")

MLP = {"name": "mlp", "hidden": [64]}
VIT = {"name": "timm", "model": "vit_tiny_patch16_224", "img_size": 32, "freeze": False}


def _matrix(cfg: dict, out, device: str) -> np.ndarray:
    return np.array(Engine(config.resolve(cfg), out, device=device).run()["acc_matrix"])


@pytest.fixture(scope="module")
def cpu_reference(tmp_path_factory):
    """Accuracy matrices of the two runs below on the CPU (fp32), computed once."""
    runs = {}
    for name, backbone, strategy in [("mlp", MLP, "replay"), ("vit", VIT, "finetune")]:
        cfg = _config(backbone, strategy)
        runs[name] = (cfg, _matrix(cfg, tmp_path_factory.mktemp(name), "cpu"))
    return runs


def _config(backbone: dict, strategy: str) -> dict:
    """sklearn digits in 3 experiences (4 + 3 + 3 classes)."""
    vit = backbone["name"] == "timm"
    return {
        "seed": 0,
        "scenario": {"name": "class_incremental", "dataset": "sklearn_digits", "n_experiences": 3, "init_classes": 4},
        "backbone": dict(backbone),
        "strategy": {"name": strategy, **({"mem_size": 200} if strategy == "replay" else {})},
        "train": {"epochs": 3, "batch_size": 32, "lr": 0.0005 if vit else 0.05, "optimizer": "adam" if vit else "sgd"},
        "logging": {"tensorboard": False, "progress": "never"},
    }


@requires_cuda
@pytest.mark.parametrize(
    ("run", "amp", "compile", "tolerance"),
    [
        ("mlp", "off", False, 0.02),  # fp32 on the GPU: float reordering only
        ("vit", "off", False, 0.05),
        ("vit", "bf16", False, 0.08),  # bf16 autocast
        ("vit", "bf16", True, 0.08),  # and torch.compile of the backbone
    ],
)
def test_cuda_run_matches_the_cpu_run(cpu_reference, tmp_path, run, amp, compile, tolerance):
    cfg, expected = cpu_reference[run]
    cfg = {**cfg, "train": {**cfg["train"], "amp": amp, "compile": compile}}
    got = _matrix(cfg, tmp_path / "run", "cuda")
    assert got.shape == expected.shape
    assert np.abs(got - expected).mean() <= tolerance, (got, expected)
    assert np.all(np.triu(got, 1) == 0)  # classes not seen yet are never predicted


def test_cpu_reference_runs_learn(cpu_reference):
    """The references are worth matching: every experience is learnt well above chance (1/4, 1/3)."""
    for run, (_, matrix) in cpu_reference.items():
        assert np.diag(matrix).min() > 0.8, (run, matrix)
