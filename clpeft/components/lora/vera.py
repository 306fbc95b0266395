"""VeRA: one pair of frozen random projections shared by every adapted layer, trained scaling vectors.

VeRA (Kopiczko et al., "VeRA: Vector-based Random Matrix Adaptation", ICLR 2024,
https://arxiv.org/abs/2310.11454, eq. 1) adapts ``W`` as ``W + Lambda_b B Lambda_d A`` with
``A: (r, in)`` and ``B: (out, r)`` random and frozen, shared by all layers, and only the
diagonals ``lambda_d`` (``r``, initialised to ``d_initial``) and ``lambda_b`` (``out``, initialised
to zero) trained. As in peft (``VeraConfig``), the shared matrices are drawn once for the largest
adapted shape from a seeded generator (kaiming-uniform, ``A`` then ``B``) and each layer uses
their top-left slice; there is no ``alpha`` (the scaling is 1). :func:`shared_projections` draws
them exactly as peft does, so outputs, gradients and merged weights agree with peft's VeRA.

The rank is the projections' rank, shared by every layer, so a VeRA layer cannot grow or be
pruned. A new update (:meth:`~clpeft.components.lora.LoRALinear.new_update`) freezes or merges
``Lambda_b B Lambda_d A`` like a LoRA update and restarts the vectors.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from clpeft.components.lora.layer import LoRALinear
from clpeft.errors import UserError

__all__ = ["VeRALinear", "shared_projections"]


def _kaiming_uniform(shape: tuple[int, int], generator: torch.Generator) -> torch.Tensor:
    """peft's VeRA init: uniform with bound ``sqrt(3) * sqrt(2) / sqrt(fan_in)``."""
    bound = math.sqrt(3.0) * math.sqrt(2) / math.sqrt(shape[1])
    return torch.empty(shape).uniform_(-bound, bound, generator=generator)


def shared_projections(shapes: Sequence[tuple[int, int]], rank: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """VeRA's shared ``A`` ``(r, max in)`` and ``B`` ``(max out, r)`` for layers of ``(out, in)`` ``shapes``.

    ``seed`` is peft's ``projection_prng_key``.
    """
    if rank < 1 or not shapes:
        raise UserError(f"VeRA needs rank >= 1 and at least one layer, got rank {rank} and {len(shapes)} layers")
    generator = torch.Generator().manual_seed(seed)
    a = _kaiming_uniform((rank, max(s[1] for s in shapes)), generator)
    b = _kaiming_uniform((max(s[0] for s in shapes), rank), generator)
    return a, b


class VeRALinear(LoRALinear):
    """A frozen ``nn.Linear`` plus ``lambda_b * B (lambda_d * A dropout(x))`` with shared frozen ``A``, ``B``.

    Args:
        base: the layer to adapt; frozen in place.
        projections: the shared ``(A, B)`` of :func:`shared_projections`; this layer's ``lora_A``
            and ``lora_B`` buffers are slices (views) of them.
        d_initial: the initial value of every entry of ``lambda_d`` (peft's default 0.1).
        dropout: dropout on the input of the update.
    """

    kind = "vera"

    def __init__(self, base: nn.Linear, projections: tuple[torch.Tensor, torch.Tensor], d_initial: float = 0.1, dropout: float = 0.0):
        shared_a, shared_b = projections
        rank = shared_a.shape[0]
        if shared_a.shape[1] < base.in_features or shared_b.shape[0] < base.out_features or shared_b.shape[1] != rank:
            raise UserError(
                f"VeRA projections A {list(shared_a.shape)}, B {list(shared_b.shape)} are too small for a "
                f"{base.in_features} -> {base.out_features} layer"
            )
        super().__init__(base, rank, alpha=rank, dropout=dropout)
        device = base.weight.device
        del self.lora_A, self.lora_B
        self.register_buffer("lora_A", shared_a.to(device)[:, : base.in_features])
        self.register_buffer("lora_B", shared_b.to(device)[: base.out_features])
        self.d_initial = d_initial
        self.lora_lambda_d = nn.Parameter(torch.empty(rank, device=device))
        self.lora_lambda_b = nn.Parameter(torch.empty(base.out_features, device=device))
        self._start_update(rank, rank)

    def _current_output(self, lora_x: torch.Tensor) -> torch.Tensor:
        return self.lora_lambda_b * F.linear(self.lora_lambda_d * F.linear(lora_x, self.lora_A), self.lora_B)

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(Lambda_d A, Lambda_b B)``: the update as LoRA factors (scaling 1)."""
        return self.lora_lambda_d[:, None] * self.lora_A, self.lora_lambda_b[:, None] * self.lora_B

    def _start_update(self, rank: int, alpha: float) -> None:
        """Restart the vectors: ``lambda_d = d_initial``, ``lambda_b = 0`` (``alpha`` has no role in VeRA)."""
        if rank != self.rank:
            raise UserError(f"a VeRA update has its shared projections' rank {self.rank}, not {rank}")
        self.scaling = 1.0
        self._replace("lora_lambda_d", torch.full_like(self.lora_lambda_d, self.d_initial))
        self._replace("lora_lambda_b", torch.zeros_like(self.lora_lambda_b))

    def grow(self, k: int, generator: torch.Generator | None = None) -> None:
        self._refuse("grow()", "every layer uses the rank of the shared projections")

    def prune(self, keep: int) -> torch.Tensor:
        self._refuse("prune()", "every layer uses the rank of the shared projections")

    def load_adapter_tensors(self, tensors: Mapping[str, torch.Tensor]) -> None:
        self._refuse("loading LoRA factors", "a VeRA update is two scaling vectors; inject kind 'lora' to load this file")

    def extra_repr(self) -> str:
        return f"rank={self.rank}, d_initial={self.d_initial:g}, frozen_rank={self.frozen_rank}, merged={self.merged}"
