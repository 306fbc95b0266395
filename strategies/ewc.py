"""Elastic Weight Consolidation.

Kirkpatrick et al., "Overcoming catastrophic forgetting in neural networks", PNAS 2017
(https://arxiv.org/abs/1612.00796). After each experience the diagonal empirical Fisher
information of the trainable parameters is recorded with the parameters themselves; training
later adds ``lambda/2 * sum_i F_i (theta_i - theta*_i)^2`` (eq. 3). ``mode: online`` is online
EWC (Schwarz et al., 2018) with decay ``gamma``.

The Fisher is the per-sample empirical Fisher (mean of squared per-sample gradients of the
cross-entropy, :func:`~clpeft.components.regularization.fisher.empirical_fisher`); the penalty is the
:class:`~clpeft.components.regularization.quadratic_penalty.QuadraticPenalty` SI and MAS share. Against Avalanche's
``EWCPlugin`` (``tests/reference/test_avalanche_baselines.py``): clpeft's ``ewc_lambda`` is twice
Avalanche's (Avalanche and Mammoth's ``ewc_on`` drop the paper's 1/2), and Avalanche squares
mini-batch gradients, an estimate that shrinks with the batch size; with those two accounted
for, training is identical in both modes.

**On a generative LLM** (``backbone.name: generative_lm``, :mod:`clpeft.components.generative`)
the trained parameters are a LoRA's (flat keys ``lora_*``): the loss is the answer-token
cross-entropy, the Fisher that of the adapters under the answer's log-likelihood
``log p(y|x)`` (the sum over its tokens), one backward per example, and the penalty anchors the
adapters at their values after each task.

Paper symbols: ``lambda`` -> ``ewc_lambda``, ``gamma`` -> ``decay``.
"""

from typing import Literal

import torch
import torch.nn.functional as F

from clpeft.components.generative import GenerativeHooks, GenerativeOptions, InstructionTuning
from clpeft.components.regularization.fisher import empirical_fisher
from clpeft.components.regularization.quadratic_penalty import QuadraticPenalty
from clpeft.data import Batch
from clpeft.experience import Experience
from clpeft.registry import register_strategy
from clpeft.schema import flat_options
from clpeft.strategy import Strategy


@register_strategy("ewc")
class EWC(GenerativeHooks, Strategy):
    """Elastic Weight Consolidation: Fisher-weighted quadratic penalty towards past parameters (Kirkpatrick et al. 2017).

    Args:
        backbone: the feature extractor.
        ewc_lambda: penalty strength ``lambda``.
        mode: ``separate`` (one term per experience) or ``online`` (one decayed term).
        decay: online EWC's ``gamma``.
        fisher_batch_size: samples per vectorised per-sample-gradient pass.
        generative: flat keys ``lora_*`` of the LoRA trained on a ``generative_lm`` backbone
            (:class:`~clpeft.components.generative.GenerativeOptions`).
    """

    @flat_options
    def __init__(
        self,
        backbone,
        ewc_lambda: float = 100.0,
        mode: Literal["separate", "online"] = "separate",
        decay: float = 1.0,
        fisher_batch_size: int = 64,
        generative: GenerativeOptions = GenerativeOptions(),
    ):
        super().__init__(backbone)
        self.ewc_lambda = ewc_lambda
        self.fisher_batch_size = fisher_batch_size
        self.penalty = QuadraticPenalty(mode, decay)
        self.generative = InstructionTuning.of(backbone, generative)

    def training_step(self, batch: Batch) -> torch.Tensor:
        loss = self.generative.loss(batch.x) if self.generative else F.cross_entropy(self.predict(batch.x), batch.y)
        if self.penalty.terms:
            loss = loss + self.ewc_lambda / 2 * self.penalty(dict(self.named_parameters()))
        return loss

    def after_experience(self, exp: Experience) -> None:
        if self.generative:
            trained = {n: p for n, p in self.named_parameters() if p.requires_grad}
            fisher = self.generative.fisher(self.batches(exp.train, self.fisher_batch_size), trained)
        else:
            batches = ((b.x, b.y) for b in self.batches(exp.train, self.fisher_batch_size))
            fisher = empirical_fisher(self, batches, F.cross_entropy)
        self.penalty.add({n: p for n, p in self.named_parameters() if n in fisher}, fisher)
