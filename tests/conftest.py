"""Shared fixtures: an isolated cache directory and small run configs."""

from __future__ import annotations

import copy
import os
import socket

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(min(2, torch.get_num_threads()))

DIGITS_RUN = {
    "seed": 0,
    "scenario": {"name": "class_incremental", "dataset": "sklearn_digits", "n_experiences": 5},
    "backbone": {"name": "mlp", "hidden": [64]},
    "strategy": {"name": "finetune"},
    "train": {"epochs": 3, "batch_size": 32, "lr": 0.05},
    "logging": {"tensorboard": False, "progress": "never"},
}


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Every test gets its own feature cache, so no test reads another's features."""
    monkeypatch.setenv("CLPEFT_CACHE", str(tmp_path_factory.mktemp("cache")))


@pytest.fixture
def digits_run():
    """A fresh copy of a 5-experience digits run config (mlp backbone, finetune)."""
    return copy.deepcopy(DIGITS_RUN)


@pytest.fixture(scope="module")
def no_network():
    """Refuse every outgoing connection and name lookup: proves a load is offline."""

    def refuse(*args, **kwargs):
        raise OSError("network access attempted in an offline test")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket.socket, "connect", refuse)
        mp.setattr(socket.socket, "connect_ex", refuse)
        mp.setattr(socket, "getaddrinfo", refuse)
        yield
