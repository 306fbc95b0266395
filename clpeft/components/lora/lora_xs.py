"""LoRA-XS: frozen factors from the weight's truncated SVD, a trained ``r x r`` matrix between them.

LoRA-XS (Bałazy et al., "LoRA-XS: Low-Rank Adaptation with Extremely Small Number of
Parameters", ECAI 2025, https://arxiv.org/abs/2405.17604, Sec. 3) truncates ``W = U S V^T`` to
rank ``r`` and adapts ``W + s B R A`` with ``B = U_r`` and ``A = S_r V_r^T`` frozen and only
``R`` (``r x r``) trained: ``r^2`` parameters per layer whatever its size. (The paper writes
``x W + x A R B`` with ``A = U_r S_r``, ``B = V_r^T`` for the transposed weight; this is the same
update.) ``R`` starts from ``N(0, sigma^2)`` with ``sigma = 1e-5`` and ``s = alpha / r``, as in the
authors' code. peft has no LoRA-XS; tests check these formulas directly.

Growth appends the next singular components of the layer's current weight with zero rows and
columns of ``R`` (the output is unchanged). Pruning is not defined: ``R`` mixes the components.
Each new update (:meth:`~clpeft.components.lora.LoRALinear.new_update`) takes the SVD of the
weight it starts from (base plus frozen updates).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from clpeft.components.lora.layer import LoRALinear
from clpeft.errors import UserError

__all__ = ["LoRAXSLinear", "singular_factors"]


def singular_factors(weight: torch.Tensor, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(S V^T, U)`` of singular components ``start..stop-1`` of ``weight`` ``(out, in)``, float32."""
    if stop > min(weight.shape):
        raise UserError(
            f"LoRA-XS rank {stop} exceeds the {weight.shape[0]} x {weight.shape[1]} weight's "
            f"{min(weight.shape)} singular values; lower the rank"
        )
    u, s, vh = torch.linalg.svd(weight.float(), full_matrices=False)
    return s[start:stop, None] * vh[start:stop], u[:, start:stop]


class LoRAXSLinear(LoRALinear):
    """A frozen ``nn.Linear`` plus ``s B R A dropout(x)``; ``A``, ``B`` frozen buffers, ``lora_R`` trained.

    Args:
        base: the layer to adapt; frozen in place.
        rank: ``r``.
        alpha: ``alpha``; scaling ``alpha / r`` (fixed, as for LoRA).
        dropout: dropout on the input of the update.
        sigma: standard deviation of ``R``'s initial entries.
    """

    kind = "lora_xs"

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0, sigma: float = 1e-5):
        super().__init__(base, rank, alpha, dropout)
        self.sigma = sigma
        lora_a, lora_b = self.lora_A, self.lora_B
        del self.lora_A, self.lora_B
        self.register_buffer("lora_A", lora_a.detach())
        self.register_buffer("lora_B", lora_b.detach())
        self.lora_R = nn.Parameter(torch.empty(rank, rank, device=lora_a.device))
        self._start_update(rank, alpha)

    def _current_output(self, lora_x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(F.linear(lora_x, self.lora_A), self.lora_R), self.lora_B) * self.scaling

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(R A, B)``: the update as LoRA factors."""
        return self.lora_R @ self.lora_A, self.lora_B

    @torch.no_grad()
    def _start_update(self, rank: int, alpha: float) -> None:
        """SVD factors of the current weight, ``R ~ N(0, sigma^2)``, scaling ``alpha / rank``."""
        a, b = singular_factors(self.effective_weight(), 0, rank)
        like = self.lora_R
        self._set_factors(a.to(like), b.to(like))
        self._replace("lora_R", torch.randn(rank, rank, device=like.device, dtype=like.dtype) * self.sigma)
        self.scaling = alpha / rank

    @torch.no_grad()
    def grow(self, k: int, generator: torch.Generator | None = None) -> None:
        """Add the next ``k`` singular components of the current weight; ``R`` gains zero rows and columns."""
        self._check_unmerged("grow()")
        a, b = singular_factors(self.effective_weight(), self.rank, self.rank + k)
        r = self.lora_R
        grown = r.new_zeros(self.rank + k, self.rank + k)
        grown[: self.rank, : self.rank] = r
        self._set_factors(torch.cat([self.lora_A, a.to(r)]), torch.cat([self.lora_B, b.to(r)], dim=1))
        self._replace("lora_R", grown)

    def prune(self, keep: int) -> torch.Tensor:
        self._refuse("prune()", "its r x r matrix R mixes the components")

    def load_adapter_tensors(self, tensors: Mapping[str, torch.Tensor]) -> None:
        self._refuse("loading LoRA factors", "its frozen factors come from the weight's SVD; inject kind 'lora' to load this file")

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, sigma={self.sigma:g}"
