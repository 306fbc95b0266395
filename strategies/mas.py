"""Memory Aware Synapses.

Aljundi et al., "Memory Aware Synapses: Learning what (not) to forget", ECCV 2018
(https://arxiv.org/abs/1711.09601). After each experience the importance of every parameter is
the mean absolute gradient of the squared L2 norm of the model's output on the experience's data
(eq. 4-5, no labels needed:
:func:`~clpeft.components.regularization.output_sensitivity.output_sensitivity`); training adds
``lambda sum_ij Omega_ij (theta_ij - theta*_ij)^2`` (eq. 6,
:class:`~clpeft.components.regularization.quadratic_penalty.QuadraticPenalty`).

Successive importances are combined as Avalanche's ``MASPlugin`` (after FACIL) does:
``Omega <- alpha Omega + (1 - alpha) Omega_new`` (the first experience's taken as it is), anchored
at the latest parameters. ``per_sample: false`` estimates the gradient per batch of
``importance_batch_size`` samples, as Avalanche; with that, training equals Avalanche's
(``tests/reference/test_classic_cil.py``). The paper's estimate, per sample, is the default.
Avalanche computes the importance in train mode, clpeft in eval mode (BatchNorm statistics
untouched, no dropout): the same on networks without either.

Rank-consistent under ``torchrun`` (``tests/strategies/test_classic_cil_ddp.py``): every rank computes the
importance over the whole experience with the synchronised model.

Paper symbols: ``lambda`` -> ``lambda_reg``; Avalanche's ``alpha`` -> ``alpha``.
"""

from __future__ import annotations

from typing import Annotated

import torch
import torch.nn.functional as F
from pydantic import Field

from clpeft.components.regularization.output_sensitivity import output_sensitivity
from clpeft.components.regularization.quadratic_penalty import QuadraticPenalty
from clpeft.data import Batch
from clpeft.experience import Experience
from clpeft.registry import register_strategy
from clpeft.strategy import Strategy


@register_strategy("mas")
class MAS(Strategy):
    """Memory Aware Synapses: a quadratic penalty weighted by the output norm's sensitivity (Aljundi et al. 2018).

    Args:
        backbone: the feature extractor.
        lambda_reg: penalty strength ``lambda``.
        alpha: weight of the running importance when a new one is added.
        per_sample: the paper's per-sample gradients (else per batch, as Avalanche).
        importance_batch_size: samples per pass when computing the importance.
    """

    def __init__(
        self,
        backbone,
        lambda_reg: Annotated[float, Field(ge=0)] = 1.0,
        alpha: Annotated[float, Field(ge=0, le=1)] = 0.5,
        per_sample: bool = True,
        importance_batch_size: Annotated[int, Field(ge=1)] = 64,
    ):
        super().__init__(backbone)
        self.lambda_reg = lambda_reg
        self.alpha = alpha
        self.per_sample = per_sample
        self.importance_batch_size = importance_batch_size
        self.penalty = QuadraticPenalty("online", decay=alpha)

    def training_step(self, batch: Batch) -> torch.Tensor:
        return F.cross_entropy(self.predict(batch.x), batch.y) + self.lambda_reg * self.penalty(dict(self.named_parameters()))

    def after_experience(self, exp: Experience) -> None:
        inputs = (b.x for b in self.batches(exp.train, self.importance_batch_size))
        importance = output_sensitivity(self, inputs, self.per_sample)
        if self.penalty.terms:  # Omega_new enters with weight 1 - alpha (the running one: alpha)
            importance = {n: (1 - self.alpha) * w for n, w in importance.items()}
        self.penalty.add({n: p for n, p in self.named_parameters() if n in importance}, importance)
