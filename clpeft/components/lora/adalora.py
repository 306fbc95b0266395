"""AdaLoRA: a LoRA update in SVD form whose singular values are masked to a shrinking rank budget.

AdaLoRA (Zhang et al., "Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning",
ICLR 2023, https://arxiv.org/abs/2303.10512) writes each update as ``P Lambda Q`` (eq. 3): here
``lora_B`` (``P``, ``out x r``), ``lora_E`` (``Lambda``, ``r x 1``, starting at zero) and ``lora_A``
(``Q``, ``r x in``), ``A`` and ``B`` drawn from ``N(0, 0.02^2)``, scaled by ``alpha / (r + 1e-5)``;
a penalty ``||P^T P - I||_F + ||Q Q^T - I||_F`` (averaged over the factors) keeps ``P`` and ``Q``
near orthogonal (eq. 4). :class:`AdaLoRAAllocator` then scores every triplet
``(P_i, lambda_i, Q_i)`` by the smoothed sensitivity of its entries
(:class:`~clpeft.components.lora.sensitivity.SmoothedSensitivity`, eq. 8-11) and zeroes the
singular values of the lowest-scoring triplets across all layers, the budget falling from the
initial total rank to ``target_rank`` per layer on a cubic schedule (eq. 12). All of it is peft's
``AdaLoraConfig`` (``SVDLinear``, ``RankAllocator``, the orthogonal regularisation), which the
tests compare against.

How it relates to clpeft's other allocation (:mod:`~clpeft.components.lora.rank_allocation`):
IncreLoRA grows layers by the same smoothed sensitivity, and PRILoRA prunes components by
weight-times-input importance; AdaLoRA masks components by sensitivity without changing shapes.
An :class:`AdaLoRALinear` also grows (new triplets start with ``lambda = 0``, the output is
unchanged) and prunes (importance of ``B_i``, ``lambda_i A_i``) like a LoRA layer.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from clpeft.components.lora.layer import LoRALinear
from clpeft.components.lora.sensitivity import SmoothedSensitivity
from clpeft.errors import UserError

__all__ = ["AdaLoRAAllocator", "AdaLoRALinear", "orthogonal_penalty"]

_STD = 0.02  # peft's (and the official code's) initialisation of P and Q


class AdaLoRALinear(LoRALinear):
    """A frozen ``nn.Linear`` plus ``alpha / (r + 1e-5) * B (E * A) dropout(x)``; ``A``, ``E``, ``B`` trained.

    Args:
        base: the layer to adapt; frozen in place.
        rank: ``r``, the initial rank (peft's ``init_r``).
        alpha: ``alpha``; the scaling ``alpha / (r + 1e-5)`` is fixed from here on.
        dropout: dropout on the input of the update.
    """

    kind = "adalora"

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__(base, rank, alpha, dropout)
        self.lora_E = nn.Parameter(torch.zeros(rank, 1, device=base.weight.device))
        self._start_update(rank, alpha)

    def _current_output(self, lora_x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(lora_x, self.lora_A * self.lora_E), self.lora_B) * self.scaling

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(E * A, B)``: the update as LoRA factors."""
        return self.lora_A * self.lora_E, self.lora_B

    @torch.no_grad()
    def _start_update(self, rank: int, alpha: float) -> None:
        """``A``, ``B`` from ``N(0, 0.02^2)``, ``E = 0``, scaling ``alpha / (rank + 1e-5)``."""
        like = self.lora_A
        self._set_factors(
            torch.randn(rank, like.shape[1], device=like.device, dtype=like.dtype) * _STD,
            torch.randn(self.lora_B.shape[0], rank, device=like.device, dtype=like.dtype) * _STD,
        )
        self._replace("lora_E", self.lora_E.new_zeros(rank, 1))
        self.scaling = alpha / (rank + 1e-5)

    @torch.no_grad()
    def grow(self, k: int, generator: torch.Generator | None = None) -> None:
        """Add ``k`` triplets: ``A`` rows and ``B`` columns from ``N(0, 0.02^2)``, ``lambda = 0`` (output unchanged)."""
        self._check_unmerged("grow()")
        a, b = self.lora_A, self.lora_B
        new_a = torch.randn(k, a.shape[1], generator=generator, dtype=a.dtype).to(a.device) * _STD
        new_b = torch.randn(b.shape[0], k, generator=generator, dtype=b.dtype).to(b.device) * _STD
        self._set_factors(torch.cat([a, new_a]), torch.cat([b, new_b], dim=1))
        self._replace("lora_E", torch.cat([self.lora_E, self.lora_E.new_zeros(k, 1)]))

    @torch.no_grad()
    def importance(self) -> torch.Tensor:
        """PRILoRA importance of each triplet, with ``lambda_i A_i`` as its ``A`` row."""
        rms = self.input_sq_mean.sqrt() if self.input_count > 0 else torch.ones_like(self.input_sq_mean)
        return self.lora_B.norm(dim=0) * (self.lora_A * self.lora_E * rms).norm(dim=1)

    @torch.no_grad()
    def prune(self, keep: int) -> torch.Tensor:
        kept = super().prune(keep)
        self._replace("lora_E", self.lora_E[kept])
        return kept

    @torch.no_grad()
    def load_adapter_tensors(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Take LoRA factors as ``A``, ``B`` with ``E = 1``, scaling ``alpha / rank``."""
        super().load_adapter_tensors(tensors)
        self._replace("lora_E", self.lora_E.new_ones(self.rank, 1))


def orthogonal_penalty(layers: Mapping[str, AdaLoRALinear]) -> torch.Tensor:
    """AdaLoRA's ``R(P, Q)`` as peft computes it: the mean over all factors of ``||P^T P - I||_F`` and ``||Q Q^T - I||_F``."""
    terms = []
    for layer in layers.values():
        a, b = layer.lora_A, layer.lora_B
        terms.append(torch.linalg.matrix_norm(a @ a.T - torch.eye(a.shape[0], device=a.device, dtype=a.dtype)))
        terms.append(torch.linalg.matrix_norm(b.T @ b - torch.eye(b.shape[1], device=b.device, dtype=b.dtype)))
    return torch.stack(terms).mean()


class AdaLoRAAllocator:
    """AdaLoRA's budget schedule and singular-value masking over :class:`AdaLoRALinear` layers.

    Call :meth:`step` after every backward (before the gradients are cleared), with the number
    of the optimizer step, as peft's ``update_and_allocate``.

    Args:
        layers: the layers sharing the budget, by name.
        target_rank: ``target_r``, the average rank per layer at the end.
        total_step: ``T``, the number of training steps.
        tinit: ``t_i``, steps before the budget starts to fall.
        tfinal: ``t_f``, steps at the end trained with the final budget (and mask).
        delta_t: ``Delta T``, steps between two maskings while the budget falls.
        beta1: ``beta_1`` of the sensitivity smoothing.
        beta2: ``beta_2`` of the uncertainty smoothing.
    """

    def __init__(
        self,
        layers: Mapping[str, AdaLoRALinear],
        target_rank: int,
        total_step: int,
        *,
        tinit: int = 0,
        tfinal: int = 0,
        delta_t: int = 1,
        beta1: float = 0.85,
        beta2: float = 0.85,
    ):
        if any(not isinstance(layer, AdaLoRALinear) for layer in layers.values()):
            raise UserError("AdaLoRAAllocator needs adalora layers (inject_lora(..., kind='adalora'))")
        if total_step - tfinal <= tinit:
            raise UserError(f"AdaLoRA needs tinit < total_step - tfinal, got tinit={tinit}, tfinal={tfinal}, total_step={total_step}")
        self.layers = dict(layers)
        self.initial_budget = sum(layer.rank for layer in self.layers.values())
        self.target_budget = target_rank * len(self.layers)
        self.total_step, self.tinit, self.tfinal, self.delta_t = total_step, tinit, tfinal, delta_t
        self.sensitivity = SmoothedSensitivity(beta1, beta2)
        self.final_mask: dict[str, torch.Tensor] | None = None

    def budget(self, step: int) -> tuple[int, bool]:
        """``(b(t), whether to mask at step t)``: the initial budget up to ``tinit``, then a cubic fall to the target."""
        if step <= self.tinit:
            return self.initial_budget, False
        if step > self.total_step - self.tfinal:
            return self.target_budget, True
        progress = 1 - (step - self.tinit) / (self.total_step - self.tfinal - self.tinit)
        return int((self.initial_budget - self.target_budget) * progress**3 + self.target_budget), step % self.delta_t == 0

    def update(self) -> None:
        """Fold the current gradients of every ``A``, ``E`` and ``B`` into the smoothed sensitivity."""
        for name, layer in self.layers.items():
            for factor in ("lora_A", "lora_E", "lora_B"):
                self.sensitivity.update((name, factor), getattr(layer, factor))

    def scores(self) -> dict[str, torch.Tensor]:
        """Each triplet's score: ``s(lambda_i)`` + the mean score of ``Q_i``'s entries + that of ``P_i``'s."""
        scores = {}
        for name, layer in self.layers.items():
            e, a, b = (self.sensitivity.score((name, f), getattr(layer, f)) for f in ("lora_E", "lora_A", "lora_B"))
            scores[name] = e.view(-1) + a.mean(dim=1) + b.mean(dim=0)
        return scores

    @torch.no_grad()
    def mask(self, budget: int) -> dict[str, torch.Tensor]:
        """Zero the singular values of all but the ``budget`` best-scoring triplets (ties at the threshold are masked).

        Returns:
            Each layer's kept triplets, a boolean ``(r,)`` mask.
        """
        scores = self.scores()
        if budget >= self.initial_budget:
            return {name: torch.ones_like(score, dtype=torch.bool) for name, score in scores.items()}
        threshold = torch.cat(list(scores.values())).kthvalue(self.initial_budget - budget).values
        kept = {name: score > threshold for name, score in scores.items()}
        for name, layer in self.layers.items():
            layer.lora_E.masked_fill_(~kept[name].view(-1, 1), 0.0)
        return kept

    def step(self, step: int) -> dict[str, torch.Tensor] | None:
        """peft's ``update_and_allocate``: score and mask while the budget falls, fix the final mask, keep applying it.

        Returns:
            The kept triplets when a mask was computed at this step, else None.
        """
        final_step = self.total_step - self.tfinal
        if step < final_step:
            self.update()
            budget, masking = self.budget(step)
            return self.mask(budget) if masking else None
        if step == final_step or self.final_mask is None:  # masked by the scores of the steps before, as peft does
            self.final_mask = self.mask(self.target_budget)
            return self.final_mask
        with torch.no_grad():
            for name, layer in self.layers.items():
                layer.lora_E.masked_fill_(~self.final_mask[name].view(-1, 1), 0.0)
        return None
