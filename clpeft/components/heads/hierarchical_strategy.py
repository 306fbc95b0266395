"""The HiDe strategies' skeleton: task-specific parameters between task-identity inference and task-adaptive prediction.

Wang, Xie, Zhang, Huang, Su & Zhu, "Hierarchical Decomposition of Prompt-Based Continual
Learning: Rethinking Obscured Sub-optimality", NeurIPS 2023 (https://arxiv.org/abs/2310.07234), and
Wang, Xie, Zhang, Su & Zhu, "HiDe-PET: Continual Learning via Hierarchical Decomposition of
Parameter-Efficient Tuning", TPAMI 2025 (https://arxiv.org/abs/2407.05229). HiDe-Prompt and
HiDe-LoRA run the same experience (the official ``hide_promtp_wtp_and_tap_engine.py`` and
``hide_lora_wtp_and_tap_engine.py``): grow the heads and start the task's parameters from the
previous task's; train them with the within-task prediction (WTP) loss, the cross-entropy plus the
contrastive regularisation; then task-identity inference (TII) on the frozen features, the momentum
consolidation of the task's parameters, and task-adaptive prediction (TAP) of the output layer; a
test sample gets the parameters of the task TII predicts. The stages are
:mod:`~clpeft.components.heads.hierarchical_decomposition`'s; :class:`HierarchicalDecomposition` runs
them and leaves the task-specific parameters to its subclass.

Not exported by :mod:`clpeft.components.heads`: it subclasses :class:`clpeft.Strategy`, whose
module imports that package.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar

import torch

from clpeft.components.heads.centroid_statistics import CentroidStatistics
from clpeft.components.heads.class_mask import ClassMask
from clpeft.components.heads.hierarchical_decomposition import (
    HierarchicalOptions,
    learn_task_identity,
    start_task,
    within_task_loss,
)
from clpeft.components.heads.task_identity import TaskIdentityInference
from clpeft.components.prompts.prompted import query_of
from clpeft.data import Batch
from clpeft.distributed import require_one_process
from clpeft.experience import Experience
from clpeft.strategy import Strategy

__all__ = ["HierarchicalDecomposition"]


class HierarchicalDecomposition(Strategy):
    """HiDe's experience around one set of task-specific parameters per task (base class).

    A subclass builds its parameters after ``super().__init__`` and then calls :meth:`add_stages`;
    it names them in :attr:`what`, returns their pool (``pool_size``, ``start_task(task)``,
    ``consolidate(task, momentum)``) from :attr:`pool`, computes :meth:`features` with them (and
    :meth:`param_groups`), and ends each experience with :meth:`learn_stages`.

    Args:
        backbone: a frozen timm ViT.
        name: the strategy's name, in the refusal to run under torchrun.
    """

    needs_query = True
    what: ClassVar[str]  # the task-specific parameters, named when the pool is too small

    def __init__(self, backbone, name: str):
        require_one_process(
            name,
            "its task-identity classifier and its heads' re-training run their own optimizer loops after each experience, outside the ranks' gradient averaging",
        )
        super().__init__(backbone)

    def add_stages(self, hierarchy: HierarchicalOptions, momentum: float, contrastive_weight: float) -> None:
        """The TII classifier, the class statistics and the mask, built after the task-specific parameters (which draw first)."""
        self.task_identity = TaskIdentityInference(self.backbone.feature_dim, hierarchy.tii_mlp_ratios, hierarchy.n_centroids)
        self.statistics = CentroidStatistics(self.backbone.feature_dim, hierarchy.n_centroids)
        self.mask = ClassMask(hierarchy.train_mask)
        self.hierarchy = hierarchy
        self.momentum, self.contrastive_weight = momentum, contrastive_weight
        self.task = 0

    @property
    def pool(self):
        """The task-specific parameters (a pool with ``pool_size``, ``start_task`` and ``consolidate``)."""
        raise NotImplementedError

    def features(self, x: torch.Tensor, tasks: torch.Tensor | int) -> torch.Tensor:
        """The representations of ``x`` with each sample's task parameters (``tasks``: one task for all, or ``(B,)``)."""
        raise NotImplementedError

    def training_features(self, x: torch.Tensor) -> torch.Tensor:
        """The representations the within-task loss trains on: the current task's."""
        return self.features(x, self.task)

    def before_experience(self, exp: Experience) -> None:
        start_task(exp, self.pool.pool_size, self.head, self.task_identity, self.mask, self.what)
        self.task = exp.index
        self.pool.start_task(exp.index)

    def training_step(self, batch: Batch) -> torch.Tensor:
        features = self.training_features(batch.x)
        return within_task_loss(self.head, self.mask, features, batch.y, self.statistics, self.contrastive_weight)

    def learn_stages(self, exp: Experience, seed: Callable[[], int], adaptive_prediction: Callable[..., None]) -> None:
        """After ``exp`` (a subclass's ``after_experience``): TII on the frozen features, the task's
        parameters consolidated, then TAP on their representations.

        Args:
            seed: draws the k-means and replay seeds (:func:`~clpeft.components.heads.hierarchical_decomposition.seeded_from_torch`).
            adaptive_prediction: the TAP stage (:func:`~clpeft.components.heads.hierarchical_decomposition.learn_task_adaptive_prediction`).

        Both are the strategy module's names, passed at each call, so that its reference test seeds
        the stages as the official run and records TAP's draws by patching that module.
        """
        learn_task_identity(self.task_identity, self.batches, self.backbone, exp, self.hierarchy.tii(), self.hierarchy.tii_tap(), seed)
        self.pool.consolidate(exp.index, self.momentum)
        instructed = lambda batch: self.features(batch.x, exp.index)  # noqa: E731
        adaptive_prediction(self.statistics, self.head, self.batches, instructed, exp, self.hierarchy.tap(), seed)

    def predict(self, x: torch.Tensor, query: torch.Tensor | None = None) -> torch.Tensor:
        """Logits over the classes seen so far, each sample with the parameters of the task TII infers from ``query`` (the cached frozen feature)."""
        tasks = self.task_identity.infer(query_of(self.backbone, x, query))
        return self.head(self.features(x, tasks))
