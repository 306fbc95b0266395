"""WA: Weight Aligning.

Zhao et al., "Maintaining Discrimination and Fairness in Class Incremental Learning", CVPR 2020
(https://arxiv.org/abs/1911.07053). Each experience trains on its data plus a herding-selected
exemplar memory (as iCaRL) with the paper's ``L = (1 - lambda) L_CE + lambda L_KD`` (eq. 3), the
temperature-``T`` distillation of the model of the previous experience on the old classes, and
``lambda = n / (n + m)`` for ``n`` old and ``m`` new classes; after every step the head's weights are
clipped to be non-negative (Sec. 3.3). After training, the new classes' weight vectors are scaled to
the old ones' mean norm (eq. 5-6, :func:`~clpeft.components.heads.weight_aligning.align_weights`).

The default loss is PyCIL's (``models/wa.py``, behind its reproduced WA numbers): ``L_CE + kd_weight
L_KD`` with ``kd_weight = 2``; ``kd_weight: null`` is the paper's weighting above, which in the digits
runs here (``configs/baselines/digits_wa.yaml``, seed 0) forgets far more (0.94 against 0.45; the
new classes keep winning). ``clip: false`` gives PyCIL's unclipped weights (0.65). The distillation
is a KL divergence without ``T^2`` (PyCIL's soft cross-entropy minus the teacher's entropy, a
constant: the same gradients).

Rank-consistent under ``torchrun`` (``tests/strategies/test_classic_cil_ddp.py``): the herding memory, the clipping
and the aligning act on the synchronised model alike on every rank.

Paper symbols: ``T`` -> ``temperature``; memory size -> ``mem_size``.
"""

from __future__ import annotations

from typing import Annotated

import torch
import torch.nn.functional as F
from pydantic import Field

from clpeft.components.heads.weight_aligning import align_weights, clip_weights
from clpeft.components.regularization.distillation import distillation_loss
from clpeft.components.regularization.exemplar_distillation import ExemplarDistillation
from clpeft.data import Batch, DataView
from clpeft.experience import Experience
from clpeft.registry import register_strategy
from clpeft.strategy import Strategy


@register_strategy("wa")
class WA(Strategy):
    """Weight Aligning: exemplars, distillation and new-class weights rescaled to the old norm (Zhao et al. 2020).

    The head's weights are also clipped to be non-negative after every step.

    Args:
        backbone: the feature extractor.
        mem_size: exemplar memory in samples (herding, ``mem_size // classes seen`` per class).
        temperature: distillation temperature ``T``.
        kd_weight: a number ``w`` for PyCIL's ``L_CE + w L_KD``; ``None`` for the paper's
            ``(1 - lambda) L_CE + lambda L_KD``.
        clip: clip the head's weights to be non-negative after every step (Sec. 3.3).
    """

    def __init__(
        self,
        backbone,
        mem_size: Annotated[int, Field(ge=0)] = 2000,
        temperature: Annotated[float, Field(gt=0)] = 2.0,
        kd_weight: Annotated[float, Field(ge=0)] | None = 2.0,
        clip: bool = True,
    ):
        super().__init__(backbone)
        self.rehearsal = ExemplarDistillation(mem_size)
        self.temperature = temperature
        self.kd_weight = kd_weight
        self.clip = clip

    def train_data(self, exp: Experience) -> DataView:
        return self.rehearsal.data(exp)

    def before_experience(self, exp: Experience) -> None:
        self.rehearsal.start(self)
        super().before_experience(exp)

    def training_step(self, batch: Batch) -> torch.Tensor:
        logits, old = self.rehearsal.outputs(self, batch)
        ce = F.cross_entropy(logits, batch.y)
        kd = 0.0 if old is None else distillation_loss(logits, old, self.temperature)
        if self.kd_weight is not None or old is None:
            return ce + (self.kd_weight or 0.0) * kd
        share = old.shape[1] / logits.shape[1]  # lambda = n / (n + m)
        return (1 - share) * ce + share * kd

    def after_training_step(self) -> bool:
        if self.clip:
            clip_weights(self.head.weight.data)
        return False

    def after_experience(self, exp: Experience) -> None:
        align_weights(self.head.weight.data, self.rehearsal.n_old)
        self.rehearsal.finish(self, exp)
