"""Where a scenario's data comes from and how much of it it keeps: options shared by the scenarios.

``class_incremental``, ``domain_incremental``, ``few_shot_class_incremental`` and
``test_time_adaptation`` take a :class:`DataSource` (``root``, ``download``,
``dataset_options``) and, all but the few-shot one, a :class:`Subsample` (``train_per_class``,
``test_per_class``). Users write their fields as flat keys of the ``scenario`` section
(:func:`clpeft.schema.flat_options`); each scenario's docstring says what they mean there (the
fields carry no description of their own, so the YAML reference shows the scenario's).
"""

from __future__ import annotations

from typing import Annotated, Any

import numpy as np
import torch
from pydantic import Field

from clpeft.data import ArrayDataset
from clpeft.scenarios import datasets
from clpeft.schema import Options

__all__ = ["DataSource", "Subsample", "per_class_subset"]


def per_class_subset(targets: torch.Tensor, per_class: int | None, rng: np.random.Generator) -> np.ndarray:
    """Indices of at most ``per_class`` samples of every class, sorted."""
    if per_class is None:
        return np.arange(len(targets))
    y = targets.numpy()
    keep = [rng.permutation(np.flatnonzero(y == c))[:per_class] for c in np.unique(y)]
    return np.sort(np.concatenate(keep))


class DataSource(Options):
    """Where the datasets live, whether torchvision may download them, and a dataset's own settings."""

    root: str = "~/.cache/clpeft/data"
    download: bool = False
    dataset_options: dict[str, Any] | None = None

    def check(self, dataset: str) -> None:
        """Checks that need no data: ``dataset`` is known and takes ``dataset_options``."""
        datasets.check_options(dataset, self.dataset_options)

    def load(self, dataset: str, options: dict | None = None) -> tuple[ArrayDataset, ArrayDataset]:
        """The training and test splits of ``dataset`` under ``root``, read with ``options`` (default ``dataset_options``)."""
        return datasets.load_dataset(dataset, self.root, self.download, self.dataset_options if options is None else options)


class Subsample(Options):
    """At most so many training and test samples per class, drawn from the run's seed."""

    train_per_class: Annotated[int, Field(ge=1)] | None = None
    test_per_class: Annotated[int, Field(ge=1)] | None = None

    def train(self, targets: torch.Tensor, rng: np.random.Generator) -> np.ndarray:
        return per_class_subset(targets, self.train_per_class, rng)

    def test(self, targets: torch.Tensor, rng: np.random.Generator) -> np.ndarray:
        return per_class_subset(targets, self.test_per_class, rng)
