"""HiDe's stages around the task-specific parameters, shared by HiDe-Prompt and HiDe-LoRA.

Wang, Xie, Zhang, Huang, Su & Zhu, "Hierarchical Decomposition of Prompt-Based Continual
Learning: Rethinking Obscured Sub-optimality", NeurIPS 2023 (https://arxiv.org/abs/2310.07234), and
Wang, Xie, Zhang, Su & Zhu, "HiDe-PET: Continual Learning via Hierarchical Decomposition of
Parameter-Efficient Tuning", TPAMI 2025 (https://arxiv.org/abs/2407.05229). Both methods train one
set of task-specific parameters per task (prefix prompts, LoRA) and share everything around them,
as the official code's ``hide_promtp_wtp_and_tap_engine.py`` and ``hide_lora_wtp_and_tap_engine.py``
do line for line:

* **within-task prediction (WTP)** loss (:func:`within_task_loss`): the masked cross-entropy plus
  ``lambda`` times the contrastive regularisation of the instructed representations against the
  stored centroids (:func:`~clpeft.components.heads.centroid_statistics.contrastive_regularisation`);
* **task-identity inference (TII)** after each task (:func:`learn_task_identity`): the
  :class:`~clpeft.components.heads.task_identity.TaskIdentityInference` classifier trained on the
  task's frozen features, their class statistics, and (from the second task on) its
  task-adaptive prediction;
* **task-adaptive prediction (TAP)** (:func:`learn_task_adaptive_prediction`): the class
  statistics of the instructed representations (the task's own parameters), then the output layer
  re-trained on features replayed from every class's statistics.

:class:`~clpeft.components.heads.hierarchical_strategy.HierarchicalDecomposition` runs the three
around a strategy's task-specific parameters.

The k-means and replay generators are seeded from torch's global generator (``seed()``, which the
engine seeds per experience), so a run is reproducible and resumable.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Annotated

import numpy as np
import torch
from pydantic import Field

from clpeft.components.heads.centroid_statistics import CentroidStatistics, contrastive_regularisation
from clpeft.components.heads.class_mask import ClassMask
from clpeft.components.heads.slow_learner import new_rows_truncated_normal
from clpeft.components.heads.task_identity import TaskIdentityInference
from clpeft.components.prompts.prompted import query_of
from clpeft.errors import UserError
from clpeft.experience import Experience
from clpeft.schema import Options

__all__ = [
    "HierarchicalOptions",
    "learn_task_adaptive_prediction",
    "learn_task_identity",
    "seeded_from_torch",
    "start_task",
    "within_task_loss",
]

Features = Callable[[object], torch.Tensor]  # a batch -> its (B, D) features


class HierarchicalOptions(Options):
    """The settings of the stages around the task-specific parameters, the same for HiDe-Prompt and HiDe-LoRA
    (defaults: the official CIFAR-100 runs)."""

    train_mask: bool = Field(True, description="cross-entropy over the current experience's classes only (official train_mask)")
    n_centroids: Annotated[int, Field(ge=1)] = Field(
        10, description="K, k-means clusters per class kept for replay and as contrastive anchors"
    )
    tap_epochs: Annotated[int, Field(ge=0)] = Field(
        30, description="task-adaptive prediction epochs (official crct_epochs), for both heads"
    )
    tap_lr: Annotated[float, Field(gt=0)] = Field(
        0.005, description="SGD learning rate of the output layer's task-adaptive prediction (official ca_lr)"
    )
    tap_samples: Annotated[int, Field(ge=1)] = Field(
        120, description="features drawn per cluster and epoch, also the batch size (official 5 * batch_size)"
    )
    tii_epochs: Annotated[int, Field(ge=1)] = Field(20, description="epochs of the task-identity classifier on each experience")
    tii_lr: Annotated[float, Field(gt=0)] = Field(0.0005 * 24 / 256, description="its Adam learning rate (official TII run's scaled lr)")
    tii_batch_size: Annotated[int, Field(ge=1)] = Field(24, description="its batch size")
    tii_tap_lr: Annotated[float, Field(gt=0)] = Field(
        0.005 * 24 / 256, description="SGD learning rate of its task-adaptive prediction (official TII run's scaled ca_lr)"
    )
    tii_tap_samples: Annotated[int, Field(ge=1)] = Field(
        24, description="features drawn per cluster and epoch for it (official batch_size)"
    )
    tii_mlp_ratios: list[Annotated[int, Field(ge=1)]] = Field([2], description="hidden widths of its MLP as multiples of the feature width")

    def tap(self) -> dict:
        """The output layer's task-adaptive prediction: ``n``, ``epochs``, ``lr``."""
        return {"n": self.tap_samples, "epochs": self.tap_epochs, "lr": self.tap_lr}

    def tii_tap(self) -> dict:
        """The task-identity classifier's task-adaptive prediction: ``n``, ``epochs``, ``lr``."""
        return {"n": self.tii_tap_samples, "epochs": self.tap_epochs, "lr": self.tii_tap_lr}

    def tii(self) -> dict:
        """The task-identity classifier's training: ``n_epochs``, ``lr``, ``batch_size``, ``train_mask``."""
        return {"n_epochs": self.tii_epochs, "lr": self.tii_lr, "batch_size": self.tii_batch_size, "train_mask": self.train_mask}


def seeded_from_torch() -> int:
    """A seed drawn from torch's global generator (which the engine seeds per experience)."""
    return int(torch.randint(2**31 - 1, ()))


def start_task(exp: Experience, pool_size: int, head, task_identity: TaskIdentityInference, mask: ClassMask, what: str) -> None:
    """Before a task: refuse one past the pool of task parameters, grow both heads (truncated normal, std 0.02), set the mask."""
    if exp.index >= pool_size:
        raise UserError(
            f"experience {exp.index + 1} needs its own {what} but the pool holds {pool_size}; set it to the number of experiences",
            key="strategy.pool_size",
        )
    new_rows_truncated_normal(head, exp.n_classes_seen)
    task_identity.grow_to(exp.n_classes_seen)
    mask.start(exp.classes_in_this_experience)


def within_task_loss(
    head, mask: ClassMask, features: torch.Tensor, labels: torch.Tensor, statistics: CentroidStatistics, weight: float
) -> torch.Tensor:
    """``CE(mask(head(h)), y) + lambda * contrastive([C; h])``: the official WTP loss (``criterion`` plus ``orth_loss``)."""
    return mask.loss(head(features), labels) + weight * contrastive_regularisation(features, statistics.centroids())


def _labelled(batches, exp: Experience, features: Features, batch_size: int | None = None, shuffle: bool = False) -> Iterator:
    """``(features(batch), labels)`` of ``exp``'s training data (read when consumed)."""
    return ((features(batch), batch.y) for batch in batches(exp.train, batch_size=batch_size, shuffle=shuffle))


def _replay_statistics(statistics: CentroidStatistics, pairs: Iterable, exp: Experience, head, tap: dict, seed: Callable[[], int]) -> None:
    """Store ``exp``'s class statistics of the ``(features, labels)`` pairs, then (after the first task) TAP of ``head``."""
    rows, labels = zip(*pairs)
    statistics.add(torch.cat(rows), torch.cat(labels), exp.classes_in_this_experience, exp.index, np.random.RandomState(seed()))
    if exp.index > 0:
        statistics.adapt(head, tap["n"], tap["epochs"], tap["lr"], generator=torch.Generator().manual_seed(seed()))


def learn_task_identity(
    task_identity: TaskIdentityInference, batches, backbone, exp: Experience, tii: dict, tap: dict, seed: Callable[[], int]
) -> None:
    """TII after ``exp``: fit on the frozen features (cached queries where the batches carry them), store their
    statistics, then task-adaptive prediction of the TII classifier.

    Args:
        batches: the strategy's ``batches(view, batch_size=, shuffle=)``.
        tii: ``n_epochs``, ``lr``, ``batch_size`` and ``train_mask`` of its training.
        tap: ``n``, ``epochs`` and ``lr`` of its task-adaptive prediction.
        seed: draws the k-means and replay seeds.
    """
    frozen = lambda batch: query_of(backbone, batch.x, batch.features)  # noqa: E731
    epoch = lambda: _labelled(batches, exp, frozen, tii["batch_size"], shuffle=True)  # noqa: E731
    task_identity.fit(epoch, tii["n_epochs"], exp.classes_in_this_experience, tii["lr"], train_mask=tii["train_mask"])
    task_identity.eval()
    _replay_statistics(task_identity.statistics, _labelled(batches, exp, frozen), exp, task_identity, tap, seed)


def learn_task_adaptive_prediction(
    statistics: CentroidStatistics, head, batches, instructed: Features, exp: Experience, tap: dict, seed: Callable[[], int]
) -> None:
    """TAP after ``exp``: the class statistics of ``instructed`` (the task's own parameters), then ``head`` re-trained."""
    with torch.no_grad():
        _replay_statistics(statistics, _labelled(batches, exp, instructed), exp, head, tap, seed)
