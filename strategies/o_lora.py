"""O-LoRA: a new LoRA per task, kept orthogonal to the past tasks' LoRAs.

Wang et al., "Orthogonal Subspace Learning for Language Model Continual Learning", EMNLP 2023
Findings (https://arxiv.org/abs/2310.14152). Each task trains a fresh LoRA on the chosen
projections while the earlier tasks' LoRAs stay in the model, frozen, and are summed with it (no
task id at inference, no stored data). The loss adds to the answer-token cross-entropy

    lambda_1 * sum_{i<t} L_orth(A_i, A_t) + lambda_2 * sum ||theta_t||_2

where ``L_orth`` sums the entries of the overlap ``A_i^T A_t`` of the past and current
down-projections (absolute values as the official code does, or their squares as the paper's
eq. 5 writes, ``squared: true``) and the L2 term is the Frobenius norm of the current ``A`` and
``B`` (:mod:`clpeft.components.lora.orthogonal_subspace`). The past LoRAs are the layers' frozen
updates (:meth:`LoRALinear.new_update <clpeft.components.lora.LoRALinear.new_update>`); the LoRA,
loss and scoring are :class:`~clpeft.components.generative.InstructionTuning`.

Defaults are the official scripts' and TRACE's ``O_LoRA``: ``lambda_1 = 0.5``, ``lambda_2 = 0``,
rank 8 on the attention's query and value projections.

Paper symbols: ``lambda_1`` -> ``orthogonal_weight``, ``lambda_2`` -> ``l2_weight``, ``r`` ->
``lora_rank``, ``alpha`` -> ``lora_alpha``.
"""

from __future__ import annotations

from typing import Annotated

import torch
from pydantic import Field

from clpeft.components.generative import GenerativeOptions, InstructionTuning
from clpeft.components.lora.orthogonal_subspace import current_l2, orthogonality_loss
from clpeft.data import Batch
from clpeft.experience import Experience
from clpeft.registry import register_strategy
from clpeft.schema import flat_options
from clpeft.strategy import Strategy


@register_strategy("o_lora")
class OLoRA(Strategy):
    """A new LoRA per task, orthogonal to the frozen past tasks' LoRAs (Wang et al. 2023).

    Args:
        backbone: a :class:`~clpeft.backbones.generative_lm.GenerativeLM`.
        orthogonal_weight: ``lambda_1``, the weight of ``L_orth``.
        l2_weight: ``lambda_2``, the weight of the current LoRA's L2 norm.
        squared: sum the overlap's squared entries (the paper's eq. 5) instead of their absolute
            values (the official code).
        generative: flat keys ``lora_targets``, ``lora_rank``, ``lora_alpha``, ``lora_dropout``
            of every task's LoRA (:class:`~clpeft.components.generative.GenerativeOptions`).
    """

    supported_scenarios = ("instruction_incremental",)
    cache_features = False

    @flat_options
    def __init__(
        self,
        backbone,
        orthogonal_weight: Annotated[float, Field(ge=0)] = 0.5,
        l2_weight: Annotated[float, Field(ge=0)] = 0.0,
        squared: bool = False,
        generative: GenerativeOptions = GenerativeOptions(),
    ):
        super().__init__(backbone)
        self.generative = InstructionTuning(backbone, generative)
        self.orthogonal_weight = orthogonal_weight
        self.l2_weight = l2_weight
        self.squared = squared
        self.rank, self.alpha = generative.lora_rank, generative.lora_alpha

    def before_experience(self, exp: Experience) -> None:
        """From the second task on, freeze the last task's LoRA and start a new one (``B = 0``: outputs unchanged)."""
        if exp.index > 0:
            for layer in self.generative.lora.values():
                layer.new_update(self.rank, self.alpha, old="freeze")

    def training_step(self, batch: Batch) -> torch.Tensor:
        layers = list(self.generative.lora.values())
        loss = self.generative.loss(batch.x) + self.orthogonal_weight * orthogonality_loss(layers, self.squared)
        return loss + self.l2_weight * current_l2(layers) if self.l2_weight else loss

    def score(self, batch: Batch) -> torch.Tensor:
        """Each example's score in [0, 1] by its task's metric, on a greedy answer (the engine's scoring hook)."""
        return self.generative.score(batch)

    def final_metrics(self) -> dict[str, float]:
        """The general text's perplexity before and after the stream (``perplexity_before/after/ratio``)."""
        return self.generative.final_metrics()
