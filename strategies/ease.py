"""EASE: one adapter set per task, an ensemble of the task subspaces, prototypes complemented for old classes.

Zhou, Sun, Ye & Zhan, "Expandable Subspace Ensemble for Pre-Trained Model-Based Class-Incremental
Learning", CVPR 2024 (https://arxiv.org/abs/2403.12030; code: LAMDA-PILOT ``models/ease.py``,
``backbone/vit_ease.py``).

1. task ``t`` trains a new set of AdaptFormer adapters (one parallel to every block's MLP,
   bottleneck ``r``, scale 0.1, dropout 0.1) with a cosine classifier over the task's classes
   only (cross-entropy); then the adapters are frozen for good. Adapter set ``j`` gives
   subspace ``j`` of the feature ``[phi_0(x), ..., phi_t(x)]``;
2. the new classes' prototypes (mean features) are taken in every subspace; old classes lack
   one in the new subspace and get it by the prototype complement (eq. 7-8: a
   similarity-weighted sum of new classes' prototypes, the similarity measured in the old
   class's own subspace);
3. prediction: the subspace ensemble of eq. 9, ``cos`` in the class's own subspace plus
   ``alpha / t`` times the others (:mod:`clpeft.components.heads.subspace_ensemble`).

Costs (counted in ``tests/reference/test_pilot_breadth.py``): training makes one backbone pass
per step (pre-trained weights + the current adapters), as PILOT does. Features of ``t + 1``
adapter sets are one pass: the embedded batch repeated ``t + 1`` times through the blocks, each
copy through its own adapters (:mod:`clpeft.components.lora.adapter_bank`); PILOT loops over the
adapter sets, ``t + 1`` passes of the blocks per test batch and ``t + 1`` passes over each task's
training data for the prototypes, where clpeft makes one. Stored: ``(t + 1) L (2 r D + r + D)``
adapter weights (``L`` blocks) and ``C (t + 1) D`` prototypes; the pre-trained weights once.

Differences from PILOT's code: the cosine learning-rate schedule (``train.schedule:
cosine_epoch``) restarts every task as PILOT's does. PILOT's ablations (``use_init_ptm``,
``use_diagonal``, ``use_old_data``, ``moni_adam``) are not offered.

Paper symbols -> parameters: adapter bottleneck ``r`` -> ``adapter_bottleneck``; the weight of
the other subspaces ``alpha`` -> ``alpha``.
"""

from __future__ import annotations

from typing import Annotated

import torch
import torch.nn.functional as F
from pydantic import Field

from clpeft.components.heads.class_statistics import ClassStatistics
from clpeft.components.heads.classifiers import CosineHead
from clpeft.components.heads.subspace_ensemble import complement_prototypes, subspace_ensemble_logits
from clpeft.components.lora.adapter_bank import every_adapter, inject_adapter_banks, split_by_adapter
from clpeft.components.lora.parallel_adapter import shared_weights_copy
from clpeft.components.prompts.prompted import promptable_width
from clpeft.data import Batch
from clpeft.experience import Experience
from clpeft.registry import register_strategy
from clpeft.strategy import Strategy


@register_strategy("ease")
class EASE(Strategy):
    """EASE: a new adapter set per task, subspace ensemble with complemented prototypes (Zhou et al. 2024).

    Args:
        backbone: a timm ViT (frozen by the strategy; the adapters go into a copy sharing its weights).
        adapter_bottleneck: ``r``, each adapter's hidden width (PILOT's ``ffn_num``).
        adapter_scale: the factor on each adapter's output (PILOT: 0.1).
        adapter_dropout: dropout on the bottleneck while training (PILOT: 0.1).
        alpha: weight of the other subspaces in the ensemble, divided by the task index (eq. 9).
        recompute_complements: recompute every old class's complemented prototypes each task with
            the classes added since (PILOT's ``recalc_sim``); ``False``: only the new subspace's.
    """

    supported_scenarios = ("class_incremental",)
    cache_features = False  # every prediction runs the adapted copy on raw inputs

    def __init__(
        self,
        backbone,
        adapter_bottleneck: Annotated[int, Field(ge=1)] = 64,
        adapter_scale: Annotated[float, Field(gt=0)] = 0.1,
        adapter_dropout: Annotated[float, Field(ge=0, lt=1)] = 0.1,
        alpha: Annotated[float, Field(ge=0)] = 0.1,
        recompute_complements: bool = True,
    ):
        super().__init__(backbone)
        promptable_width(backbone, "ease")
        backbone.freeze()
        self.dim = backbone.feature_dim
        self.alpha = alpha
        self.recompute_complements = recompute_complements
        self.adapted = shared_weights_copy(backbone)
        self.banks = inject_adapter_banks(self.adapted.net, adapter_bottleneck, adapter_scale, adapter_dropout)
        self.head = CosineHead(self.dim)  # the current task's classifier (PILOT's proxy_fc)
        self.register_buffer("prototypes", torch.zeros(0, 0, self.dim))
        self.register_buffer("task_of_class", torch.zeros(0, dtype=torch.long))
        self._local_label = torch.zeros(0, dtype=torch.long)

    @property
    def n_subspaces(self) -> int:
        """Adapter sets trained and frozen so far."""
        return self.banks[0].n_frozen

    def every_feature(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, n, D)``: every frozen adapter set's feature of raw inputs ``x``, in one pass."""
        n = self.n_subspaces
        with every_adapter(self.adapted.net, self.banks, n):
            return split_by_adapter(self.adapted(x), n)

    # ------------------------------------------------------------------ hooks

    def before_experience(self, exp: Experience) -> None:
        task = self.n_subspaces
        for bank in self.banks:
            bank.new_adapter()
        self.head = CosineHead(self.dim, len(exp.classes_in_this_experience)).to(self.prototypes.device)
        grow = exp.n_classes_seen - len(self.task_of_class)
        if grow > 0:
            self.task_of_class = torch.cat([self.task_of_class, self.task_of_class.new_full((grow,), -1)])
            self.prototypes = torch.cat([self.prototypes, self.prototypes.new_zeros(grow, *self.prototypes.shape[1:])])
        classes = torch.as_tensor(exp.classes_in_this_experience, device=self.task_of_class.device)
        self.task_of_class[classes] = task
        self._local_label = torch.full((exp.n_classes_seen,), -100, dtype=torch.long)
        self._local_label[classes.cpu()] = torch.arange(len(classes))

    def training_step(self, batch: Batch) -> torch.Tensor:
        """Cross-entropy of the task's cosine classifier on the current adapters' feature."""
        return F.cross_entropy(self.head(self.adapted(batch.x)), self._local_label.to(batch.y.device)[batch.y])

    @torch.no_grad()
    def after_experience(self, exp: Experience) -> None:
        for bank in self.banks:
            bank.freeze_current()
        n = self.n_subspaces
        stats = ClassStatistics(n * self.dim, covariance="none").to(self.prototypes.device)
        for batch in self.batches(exp.train, shard=True):
            stats.update(self.every_feature(batch.x).reshape(len(batch.y), -1), batch.y)
        stats = stats.gathered()
        prototypes = self.prototypes.new_zeros(len(self.prototypes), n, self.dim)
        prototypes[:, : self.prototypes.shape[1]] = self.prototypes
        classes = torch.as_tensor(exp.classes_in_this_experience, device=prototypes.device)
        prototypes[classes] = stats.means()[classes].view(len(classes), n, self.dim).to(prototypes)
        complement_prototypes(prototypes, self.task_of_class, n, self.recompute_complements)
        self.prototypes = prototypes

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """The subspace ensemble over every frozen adapter set (all-zero logits before the first)."""
        if self.n_subspaces == 0:
            return x.new_zeros(len(x), len(self.task_of_class), dtype=torch.float32)
        return subspace_ensemble_logits(self.every_feature(x).float(), self.prototypes, self.task_of_class, self.alpha)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for name in ("prototypes", "task_of_class"):
            stored = state_dict.get(prefix + name)
            if stored is not None:
                setattr(self, name, torch.zeros_like(stored, device=getattr(self, name).device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
