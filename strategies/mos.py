"""MOS: Model Surgery for pre-trained model-based class-incremental learning.

Sun, Zhou, Zhao, Gan, Zhan & Ye, "MOS: Model Surgery for Pre-Trained Model-Based Class-Incremental
Learning", AAAI 2025 (https://arxiv.org/abs/2412.09441; code: LAMDA-PILOT ``models/mos.py``,
``backbone/vit_mos.py``, ``exps/mos*.json``).

1. Task ``t`` trains an AdaptFormer adapter set (bottleneck ``r`` = 16, scale 0.1) that starts
   from task ``t - 1``'s, with a linear head over every class (cross-entropy over the task's
   classes; the head at a tenth of the adapters' learning rate) plus the prototype contrast
   ``lambda L_con`` (:mod:`~clpeft.components.regularization.prototype_contrast`). After every
   step the adapter is merged towards the mean of the earlier ones (eq. 5, ``beta``,
   :mod:`~clpeft.components.lora.adapter_merging`), then frozen at the task's end.
2. The task's classes get a Gaussian of their features (adapter ``t``) and, from task 1 on, the
   head is re-trained on samples of every class's Gaussian (classifier alignment, SGD, cosine,
   ``align_epochs``, ``5 B`` samples per class and batch); their first adapter's class means are
   the prototypes of the first guess.
3. Prediction: self-refined adapter retrieval and the ensemble with the first guess
   (:mod:`~clpeft.components.heads.self_refined_retrieval`).

Costs: one backbone pass per training step (PILOT too). A test batch is one batched pass over all
``t + 1`` adapters (:func:`~clpeft.components.lora.adapter_bank.every_adapter`); PILOT makes ``t + 2``
(the first adapter for the guess, then one per adapter). After a task, one batched pass per batch of
its training data gives both the adapter-``t`` statistics and the adapter-0 means; PILOT makes one
per class plus one per batch, but through two adapters where the batched pass carries all ``t + 1``
(``tests/reference/test_pilot_mos_duct.py`` counts both).
Stored: ``(t + 1) L (2 r D + r + D)`` adapter weights, ``C`` means and covariances ``D x D``, ``C D``
prototypes.

Differences from PILOT's code, deliberate: its ``reweight_adapter`` merges in place on every
forward call, once per block (12 times per training forward before the step's own merge, and
12 times per *test* batch on the stored adapters of tasks 1..t, so its accuracy depends on the
number of test batches); clpeft merges once per step (eq. 5) and never at test time. To match
its training pull per step, ``beta = 1 - (1 - 0.1)^13`` (0.75). Its ``multi-centroid`` and
``variance`` storage options are not offered (the published runs use ``covariance``).

Paper symbols -> parameters: ``r`` -> ``adapter_bottleneck``; ``beta`` -> ``merge_beta``
(PILOT's ``adapter_momentum``); ``lambda`` -> ``contrast_weight`` (``reg``); the alignment's
epochs and lr -> ``align_epochs`` (``crct_epochs``), ``align_lr`` (``ca_lr``).
"""

from __future__ import annotations

from typing import Annotated

import torch
from pydantic import Field

from clpeft.components.heads.alignment import ClassifierAlignment
from clpeft.components.heads.class_mask import ClassMask
from clpeft.components.heads.class_statistics import ClassStatistics
from clpeft.components.heads.self_refined_retrieval import ensemble, self_refined_logits
from clpeft.components.lora.adapter_bank import every_adapter, inject_adapter_banks, split_by_adapter
from clpeft.components.lora.adapter_merging import merge_towards_mean, start_from_last
from clpeft.components.lora.parallel_adapter import shared_weights_copy
from clpeft.components.prompts.prompted import promptable_width
from clpeft.components.regularization.prototype_contrast import prototype_contrast
from clpeft.data import Batch
from clpeft.experience import Experience
from clpeft.registry import register_strategy
from clpeft.strategy import Strategy


@register_strategy("mos")
class MOS(Strategy):
    """MOS: merged adapters per task, classifier alignment, self-refined adapter retrieval (Sun et al. 2025).

    Args:
        backbone: a timm ViT (frozen; the adapters go into a copy sharing its weights).
        adapter_bottleneck: ``r`` (PILOT's ``ffn_num``).
        merge_beta: ``beta`` of eq. 5 (PILOT's ``adapter_momentum``; see the module docstring).
        contrast_weight: ``lambda``, weight of the prototype contrast (PILOT's ``reg``).
        head_lr_factor: the head's learning rate over the adapters' (PILOT: 0.1).
        align_epochs: classifier-alignment epochs (``crct_epochs``).
        align_lr: classifier-alignment learning rate (``ca_lr``).
        align_weight_decay: its weight decay (PILOT: the run's ``weight_decay``).
        align_samples: features sampled per class and epoch, also the batch (PILOT: 5 x batch size).
        max_iterations: head evaluations of the self-refined retrieval (PILOT: 4).
        ensemble_first_guess: add the first guess's softmax to the refined one (PILOT's ``ensemble``).
    """

    supported_scenarios = ("class_incremental",)
    cache_features = False  # every step and prediction runs the adapted copy on raw inputs

    def __init__(
        self,
        backbone,
        adapter_bottleneck: Annotated[int, Field(ge=1)] = 16,
        merge_beta: Annotated[float, Field(ge=0, le=1)] = 0.1,
        contrast_weight: Annotated[float, Field(ge=0)] = 0.1,
        head_lr_factor: Annotated[float, Field(gt=0)] = 0.1,
        align_epochs: Annotated[int, Field(ge=0)] = 30,
        align_lr: Annotated[float, Field(gt=0)] = 0.005,
        align_weight_decay: Annotated[float, Field(ge=0)] = 0.0005,
        align_samples: Annotated[int, Field(ge=2)] = 240,
        max_iterations: Annotated[int, Field(ge=1)] = 4,
        ensemble_first_guess: bool = True,
    ):
        super().__init__(backbone)
        promptable_width(backbone, "mos")
        backbone.freeze()
        self.dim = backbone.feature_dim
        self.adapted = shared_weights_copy(backbone)
        self.banks = inject_adapter_banks(self.adapted.net, adapter_bottleneck, 0.1, 0.1)
        self.merge_beta, self.contrast_weight, self.head_lr_factor = merge_beta, contrast_weight, head_lr_factor
        self.max_iterations, self.ensemble_first_guess = max_iterations, ensemble_first_guess
        self.alignment = ClassifierAlignment(
            self.dim, align_samples, align_epochs, align_lr, weight_decay=align_weight_decay, temperature=None, mean_shrink=0.0
        )
        self.mask = ClassMask()
        self.register_buffer("prototypes", torch.zeros(0, self.dim))

    @property
    def n_tasks(self) -> int:
        return self.banks[0].n_frozen

    def every_feature(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, n, D)``: every frozen adapter set's feature of raw inputs ``x``, in one pass."""
        with every_adapter(self.adapted.net, self.banks, self.n_tasks):
            return split_by_adapter(self.adapted(x), self.n_tasks)

    def before_experience(self, exp: Experience) -> None:
        super().before_experience(exp)
        for bank in self.banks:
            bank.new_adapter()
            start_from_last(bank)
        self.mask.start(exp.classes_in_this_experience)

    def param_groups(self, lr: float) -> list[dict]:
        adapters = [p for bank in self.banks for p in bank.current.parameters()]
        return [{"params": adapters, "lr": lr}, {"params": list(self.head.parameters()), "lr": lr * self.head_lr_factor}]

    def training_step(self, batch: Batch) -> torch.Tensor:
        features = self.adapted(batch.x)
        seen = self.alignment.stats.seen()
        means = self.alignment.stats.means()[seen] if len(seen) else None
        contrast = prototype_contrast(features, means)
        return self.mask.loss(self.head(features), batch.y) + self.contrast_weight * contrast

    def after_training_step(self) -> bool:
        for bank in self.banks:
            merge_towards_mean(bank, self.merge_beta)
        return False

    @torch.no_grad()
    def after_experience(self, exp: Experience) -> None:
        for bank in self.banks:
            bank.freeze_current()
        last, first = ClassStatistics(self.dim, covariance="per_class"), ClassStatistics(self.dim, covariance="none")
        last, first = last.to(self.prototypes.device), first.to(self.prototypes.device)
        for batch in self.batches(exp.train, shard=True):
            features = self.every_feature(batch.x).double()
            last.update(features[:, -1], batch.y)
            first.update(features[:, 0], batch.y)
        self.alignment.add(last.gathered(), exp.index)
        classes = torch.as_tensor(exp.classes_in_this_experience, device=self.prototypes.device)
        prototypes = self.prototypes.new_zeros(exp.n_classes_seen, self.dim)
        prototypes[: len(self.prototypes)] = self.prototypes
        prototypes[classes] = first.gathered().means()[classes].to(prototypes)
        self.prototypes = prototypes
        if exp.index > 0:
            self.alignment.align(self.head)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """The retrieval's refined logits, plus the first guess's softmax when ``ensemble_first_guess``."""
        if self.n_tasks == 0:
            return x.new_zeros(len(x), self.head.n_classes, dtype=torch.float32)
        features = self.every_feature(x).float()
        first_guess = torch.nn.functional.normalize(features[:, 0], dim=1) @ torch.nn.functional.normalize(self.prototypes, dim=1).T
        task_of_class = self.alignment.task_of_class.to(x.device)
        refined = self_refined_logits(self.head(features), first_guess, task_of_class, self.max_iterations)
        return ensemble(refined, first_guess, self.n_tasks) if self.ensemble_first_guess else refined

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        stored = state_dict.get(prefix + "prototypes")
        if stored is not None:
            self.prototypes = torch.zeros_like(stored, device=self.prototypes.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
