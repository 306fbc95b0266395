"""BiC: Bias Correction.

Wu et al., "Large Scale Incremental Learning", CVPR 2019 (https://arxiv.org/abs/1905.13260). From the
second experience on, a class-balanced validation set is held out of the new data and the exemplar
memory (``val_fraction`` of the smallest old class's exemplars per class); training on the rest
minimises ``(1 - lambda) L_c + lambda L_d`` (eq. 1-3) with ``lambda = n / (n + m)`` for ``n`` old
and ``m`` new classes and ``L_d`` the temperature-``T`` distillation of the previous model's outputs
on the old classes (after that model's own correction: Mammoth's ``distill_after_bic``). After
training, the bias correction layer ``alpha o + beta`` on the new classes' logits is fitted on the
validation set with everything else frozen (eq. 4-5,
:class:`~clpeft.components.heads.bias_correction.BiasCorrection`) and used at prediction.

As Mammoth's ``models/bic.py`` (``tests/reference/test_classic_cil.py`` checks the training against its
``observe`` and the fitted ``alpha, beta`` against its ``end_task``): ``L_d`` is multiplied by
``T^2`` (Hinton et al.), the layer is fitted with Adam at 1e-3 for ``bias_epochs`` (250) and no
correction is applied while an experience trains. On a small validation set 250 epochs are few Adam
steps and barely move ``alpha, beta``: ``configs/baselines/digits_bic.yaml`` needs 2000. Mammoth's ``lambda = 1 / (t + 1)`` equals the
paper's on the second experience only (with equal splits); clpeft follows the paper. Mammoth draws
its validation set as about ``valset_split`` of the memory plus as many new samples; clpeft balances
it per class, as the paper describes. The memory is iCaRL's herding by default (PyCIL), Mammoth's
is ``class_balanced``-like (the first samples of each experience).

Rank-consistent under ``torchrun`` (``tests/strategies/test_classic_cil_ddp.py``): the validation split and the
fitting's shuffles draw from the random state the engine re-seeds identically on every rank after
training, and the fit reads the whole validation set on each rank.

Paper symbols: ``T`` -> ``temperature``; memory size -> ``mem_size``.
"""

from __future__ import annotations

import copy
from typing import Annotated

import torch
import torch.nn.functional as F
from pydantic import Field

from clpeft.components.heads.bias_correction import BiasCorrection
from clpeft.components.heads.nearest_mean_of_exemplars import labelled_features
from clpeft.components.memory.replay import Policy
from clpeft.components.regularization.distillation import distillation_loss
from clpeft.components.regularization.exemplar_distillation import ExemplarDistillation
from clpeft.data import Batch, DataView
from clpeft.experience import Experience
from clpeft.registry import register_strategy
from clpeft.strategy import Strategy


@register_strategy("bic")
class BiC(Strategy):
    """BiC: exemplars, distillation and a bias correction of the new classes' logits (Wu et al. 2019).

    The correction ``alpha o + beta`` is fitted on a held-out class-balanced validation set.

    Args:
        backbone: the feature extractor.
        mem_size: exemplar memory in samples.
        policy: how the memory is chosen (``herding``, ``class_balanced``, ``reservoir``).
        val_fraction: validation samples per class, as a fraction of the smallest old class's exemplars.
        temperature: distillation temperature ``T``.
        bias_epochs: passes over the validation set when fitting ``alpha, beta``.
        bias_batch_size: validation samples per Adam step.
        distill_corrected: distil the previous model's corrected outputs (Mammoth's ``distill_after_bic``).
    """

    def __init__(
        self,
        backbone,
        mem_size: Annotated[int, Field(ge=1)] = 2000,
        policy: Policy = "herding",
        val_fraction: Annotated[float, Field(gt=0, lt=1)] = 0.1,
        temperature: Annotated[float, Field(gt=0)] = 2.0,
        bias_epochs: Annotated[int, Field(ge=0)] = 250,
        bias_batch_size: Annotated[int, Field(ge=1)] = 32,
        distill_corrected: bool = True,
    ):
        super().__init__(backbone)
        self.rehearsal = ExemplarDistillation(mem_size, policy)
        self.correction = BiasCorrection()
        self.val_fraction = val_fraction
        self.temperature = temperature
        self.bias_epochs = bias_epochs
        self.bias_batch_size = bias_batch_size
        self.distill_corrected = distill_corrected
        self.teacher_correction: BiasCorrection | None = None
        self.validation: DataView | None = None

    def before_experience(self, exp: Experience) -> None:
        self.rehearsal.start(self)
        if self.rehearsal.n_old and self.distill_corrected:
            self.teacher_correction = copy.deepcopy(self.correction)
        self.correction.fit(lambda: (), 0, 0, epochs=0)  # no correction while training
        super().before_experience(exp)

    def train_data(self, exp: Experience) -> DataView:
        data = self.rehearsal.data(exp)
        if not self.rehearsal.n_old:
            self.validation = None
            return data
        labels = data.targets
        old = self.rehearsal.memory.labels
        k = max(1, round(self.val_fraction * int(torch.bincount(old).masked_select(torch.bincount(old) > 0).min())))
        held = torch.cat(
            [idx[torch.randperm(len(idx))[:k]] for c in torch.unique(labels).tolist() for idx in [torch.nonzero(labels == c).flatten()]]
        )
        kept = torch.ones(len(labels), dtype=torch.bool)
        kept[held] = False
        self.validation = data.take(held.sort().values)
        return data.take(torch.nonzero(kept).flatten())

    def training_step(self, batch: Batch) -> torch.Tensor:
        logits, old = self.rehearsal.outputs(self, batch)
        if old is None:
            return F.cross_entropy(logits, batch.y)
        if self.teacher_correction is not None:
            old = self.teacher_correction(old)
        share = old.shape[1] / logits.shape[1]  # lambda = n / (n + m)
        distillation = self.temperature**2 * distillation_loss(logits, old, self.temperature)
        return (1 - share) * F.cross_entropy(logits, batch.y) + share * distillation

    def after_experience(self, exp: Experience) -> None:
        if self.validation is not None:
            self.correction.fit(self._validation_batches(), self.rehearsal.n_old, self.head.n_classes, self.bias_epochs)
        self.teacher_correction = self.validation = None
        self.rehearsal.finish(self, exp)

    def _validation_batches(self):
        """Each call: one shuffled epoch of ``(uncorrected logits, labels)`` of the validation set."""
        with torch.no_grad():
            logits, labels = labelled_features(self.batches(self.validation), lambda x: self.head(self.embed(x)), self.head.n_classes)
        logits, labels = logits.to(self.device), labels.to(self.device)

        def epoch():
            order = torch.randperm(len(labels)).to(self.device)
            return ((logits[chunk], labels[chunk]) for chunk in order.split(self.bias_batch_size))

        return epoch

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """The head's logits with the latest experience's classes corrected."""
        return self.correction(self.head(self.embed(x)))
