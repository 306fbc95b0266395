"""LUCIR: Learning a Unified Classifier Incrementally via Rebalancing.

Hou, Pan, Loy, Wang & Lin, CVPR 2019
(http://openaccess.thecvf.com/content_CVPR_2019/html/Hou_Learning_a_Unified_Classifier_Incrementally_via_Rebalancing_CVPR_2019_paper.html).
Each experience trains on its data plus a herding exemplar memory
(:class:`~clpeft.components.regularization.exemplar_distillation.ExemplarDistillation`) with

``L = L_ce + lambda L_dis^G + lambda_mr L_mr`` (eq. 9):

* **cosine normalisation** (eq. 4): the logits are ``sigma cos(w_c, f)`` with a learnable scale
  ``sigma`` (:class:`~clpeft.components.CosineHead`, ``sigma`` starting at 1); only the current
  experience's rows train, the others are held
  (:class:`~clpeft.components.heads.imprinting.HeldRows`); a new class's row is imprinted from its
  samples' mean feature (:func:`~clpeft.components.heads.imprinting.imprint_rows`);
* **less-forget constraint** (eq. 6): ``L_dis^G = 1 - cos(f, f*)`` between the current features and
  those of the model frozen at the start of the experience, with the adaptive
  ``lambda = lambda_base sqrt(|C_o| / |C_n|)`` (eq. 7; old over new classes);
* **inter-class separation** (eq. 8,
  :func:`~clpeft.components.regularization.margin_ranking.margin_ranking_loss`): an old-class
  exemplar's cosine must beat its ``K`` highest new-class cosines by the margin ``m``.

After the memory update the classifier (``sigma`` and the current experience's rows) is fine-tuned
on the class-balanced memory with the same loss (the class-balanced finetuning of the paper's
Sec. 4.1), as Mammoth's ``models/lucir.py`` does: ``finetune_epochs`` passes of SGD at
``finetune_lr``, divided by 10 after 10 steps (Mammoth's scheduler steps per batch), without
momentum or weight decay (Mammoth's default ``optim_mom`` and ``optim_wd``).

Equal to Mammoth's step by step (losses, parameters, imprinted rows, the finetuning:
``tests/reference/test_mammoth_lucir_xder.py``), with the defaults of its ``get_parser``. Where
clpeft differs, and why: ``lambda`` follows eq. 7 and the official code (``sqrt(old / new)``: 5 in
the second experience of equal splits); Mammoth sets it after a task from the index of the task
just trained, so its second task trains with ``lambda = 0`` and each later one with the previous
task's value. The herding features are L2-normalised (the official code, iCaRL; Mammoth's
``fill_buffer`` herds raw features). The finetuning computes features in eval mode (Mammoth: train
mode with BatchNorm statistics frozen).

Paper symbols: ``lambda_base`` -> ``lambda_base``, ``lambda_mr`` -> ``lambda_mr``, ``K`` -> ``k``,
``m`` -> ``margin``; memory size -> ``mem_size``.
"""

from __future__ import annotations

import math
from typing import Annotated

import torch
import torch.nn.functional as F
from pydantic import Field

from clpeft.components import CosineHead
from clpeft.components.heads.imprinting import HeldRows, imprint_rows
from clpeft.components.heads.nearest_mean_of_exemplars import labelled_features
from clpeft.components.regularization.exemplar_distillation import ExemplarDistillation
from clpeft.components.regularization.margin_ranking import margin_ranking_loss
from clpeft.data import Batch, DataView
from clpeft.distributed import require_one_process
from clpeft.errors import UserError
from clpeft.experience import Experience
from clpeft.registry import register_strategy
from clpeft.strategy import Strategy

#: Mammoth's ``ft_lr_strat``: the finetuning's learning rate is divided by 10 after this many steps.
FINETUNE_DECAY_STEP = 10


@register_strategy("lucir")
class LUCIR(Strategy):
    """LUCIR: cosine classifier, less-forget feature distillation and a margin ranking loss on exemplars (Hou et al. 2019).

    Args:
        backbone: the feature extractor.
        mem_size: exemplar memory in samples (herding, ``mem_size // classes seen`` per class).
        lambda_base: ``lambda_base`` of the adaptive less-forget weight (eq. 7).
        lambda_mr: weight ``lambda_mr`` of the margin ranking loss.
        k: hard negatives ``K`` per old-class sample.
        margin: the margin ``m``.
        finetune_epochs: passes of class-balanced finetuning over the memory after each experience (0: none).
        finetune_lr: its learning rate.
        imprint: imprint the new classes' rows from their mean features.
    """

    supported_scenarios = ("class_incremental",)

    def __init__(
        self,
        backbone,
        mem_size: Annotated[int, Field(ge=1)] = 2000,
        lambda_base: Annotated[float, Field(ge=0)] = 5.0,
        lambda_mr: Annotated[float, Field(ge=0)] = 1.0,
        k: Annotated[int, Field(ge=1)] = 2,
        margin: Annotated[float, Field(ge=0)] = 0.5,
        finetune_epochs: Annotated[int, Field(ge=0)] = 20,
        finetune_lr: Annotated[float, Field(gt=0)] = 0.01,
        imprint: bool = True,
    ):
        require_one_process(
            "lucir",
            "its margin ranking loss averages over the old-class samples of a batch, which each rank's share holds in different numbers, so two processes would not train as one",
        )
        super().__init__(backbone)
        self.head = CosineHead(backbone.feature_dim, scale=1.0, learn_scale=True)
        self.rehearsal = ExemplarDistillation(mem_size)
        self.held = HeldRows()
        self.lambda_base = lambda_base
        self.lambda_mr = lambda_mr
        self.k = k
        self.margin = margin
        self.finetune_epochs = finetune_epochs
        self.finetune_lr = finetune_lr
        self.imprint = imprint
        self.n_past = 0
        self.less_forget = 0.0  # lambda of the experience being trained

    def before_experience(self, exp: Experience) -> None:
        self.rehearsal.start(self)
        super().before_experience(exp)
        self.n_past = exp.past[-1].n_classes_seen if exp.past else 0
        new = exp.n_classes_seen - self.n_past
        if self.n_past and new < self.k:
            raise UserError(
                f"lucir's k={self.k} hard negatives need as many new classes, experience {exp.index} has {new}; lower it", key="strategy.k"
            )
        self.less_forget = self.lambda_base * math.sqrt(self.n_past / new)
        if self.imprint and self.n_past:
            with torch.no_grad():
                features, labels = labelled_features(self.batches(exp.train), self.embed, self.backbone.feature_dim)
            imprint_rows(self.head.weight.data, self.n_past, features, labels)
        self.held.hold(self.head.weight, range(self.n_past, exp.n_classes_seen))

    def train_data(self, exp: Experience) -> DataView:
        return self.rehearsal.data(exp)

    def training_step(self, batch: Batch) -> torch.Tensor:
        return self._loss(self.embed(batch.x), batch, self.less_forget)

    def after_training_step(self) -> bool:
        self.held.restore(self.head.weight.data)
        return False

    def after_experience(self, exp: Experience) -> None:
        self.rehearsal.finish(self, exp)
        if self.finetune_epochs:
            self._finetune(self.rehearsal.memory.view((*exp.past, exp)))

    def _loss(self, features: torch.Tensor, batch: Batch, less_forget: float) -> torch.Tensor:
        """Eq. 9 on a batch whose current features are ``features``."""
        cosines = self.head.cosines(features)  # eq. 8 ranks the unscaled cosines
        loss = F.cross_entropy(self.head.scale.to(cosines.dtype) * cosines, batch.y)
        if not self.n_past:
            return loss
        if less_forget:
            old = self.rehearsal.teacher.features(batch.x, features)
            loss = loss + less_forget * F.cosine_embedding_loss(features, old, torch.ones(len(features), device=features.device))
        return loss + self.lambda_mr * margin_ranking_loss(cosines, batch.y, self.n_past, self.k, self.margin)

    def _finetune(self, memory: DataView) -> None:
        """Class-balanced finetuning of ``sigma`` and the current rows on the memory (features fixed)."""
        optimizer = torch.optim.SGD(self.head.parameters(), lr=self.finetune_lr)
        schedule = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones=[FINETUNE_DECAY_STEP], gamma=0.1)
        with torch.enable_grad():
            for _ in range(self.finetune_epochs):
                for batch in self.batches(memory, shuffle=True):
                    with torch.no_grad():
                        features = self.embed(batch.x)
                    loss = self._loss(features, batch, 0.0)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                    self.held.restore(self.head.weight.data)
                    schedule.step()
