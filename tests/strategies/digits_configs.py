"""A small class-incremental digits run for strategy tests: an MLP on scikit-learn digits, on the CPU in seconds."""

from __future__ import annotations


def digits_mlp_config(tmp_path, strategy: dict, *, epochs: int = 1, **scenario) -> dict:
    """The run's configuration: ``strategy`` on 16 training and 6 test images per class (``scenario`` overrides,
    e.g. ``n_experiences``), an MLP of hidden sizes 32 and 16, Adam at 0.01 in batches of 16, no baseline."""
    return {
        "seed": 0,
        "scenario": {
            "name": "class_incremental",
            "dataset": "sklearn_digits",
            "n_experiences": 2,
            "train_per_class": 16,
            "test_per_class": 6,
            "root": str(tmp_path / "data"),
            **scenario,
        },
        "backbone": {"name": "mlp", "hidden": [32, 16]},
        "strategy": strategy,
        "train": {"epochs": epochs, "batch_size": 16, "lr": 0.01, "optimizer": "adam"},
        "eval": {"batch_size": 256, "baseline": False},
        "logging": {"tensorboard": False, "progress": "never"},
    }
