"""The exemplar and regularisation methods under ``torchrun``: two processes give one process's matrix.

iCaRL, WA, BiC, SI and MAS are rank-consistent, so they run data-parallel rather than refuse:
every decision that is not a gradient step is taken identically on every rank. Their memories
are chosen after training from passes over the whole experience that each rank makes alike (herding
on features of the synchronised model), BiC's validation split and its fitting's shuffles
draw from the random state the engine re-seeds identically on every rank before
``after_experience`` (and which evaluation leaves alone), SI's path integral reads the gradients
after DDP has averaged them, and MAS's importance is a pass over the whole experience. Slow: each
case starts ``torchrun`` twice.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import yaml

METHODS = {
    "icarl": {"name": "icarl", "mem_size": 40},
    "wa": {"name": "wa", "mem_size": 40},
    "bic": {"name": "bic", "mem_size": 40, "bias_epochs": 20},
    "si": {"name": "si", "c": 1.0},
    "mas": {"name": "mas", "lambda_reg": 1.0},
}


def _run(config, out, nproc: int) -> subprocess.CompletedProcess:
    launcher = (
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1 else [sys.executable]
    )
    return subprocess.run(
        [*launcher, "-m", "clpeft", "run", str(config), "--out", str(out), "--device", "cpu"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"},
    )


@pytest.mark.slow
@pytest.mark.parametrize("method", list(METHODS))
def test_two_processes_give_one_process_matrix(tmp_path, method):
    cfg = {
        "seed": 0,
        "scenario": {
            "name": "class_incremental",
            "dataset": "sklearn_digits",
            "n_experiences": 3,
            "init_classes": 4,
            "train_per_class": 30,
            "test_per_class": 10,
            "root": str(tmp_path / "data"),
        },
        "backbone": {"name": "mlp", "hidden": [32]},
        "strategy": METHODS[method],
        "train": {"epochs": 3, "batch_size": 32, "lr": 0.05},
        "eval": {"baseline": False},
        "logging": {"tensorboard": False, "progress": "never"},
    }
    config = tmp_path / f"{method}.yaml"
    config.write_text(yaml.safe_dump(cfg))
    matrices = []
    for nproc in (1, 2):
        done = _run(config, tmp_path / f"run{nproc}", nproc)
        assert done.returncode == 0, done.stderr[-2000:]
        matrices.append(json.loads((tmp_path / f"run{nproc}" / "metrics.json").read_text())["acc_matrix"])
    np.testing.assert_allclose(matrices[1], matrices[0], atol=1e-6)
    assert np.mean(np.diagonal(matrices[0])) > 0.6
