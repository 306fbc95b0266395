"""PiSSA's starting point of a LoRA update: the principal singular components of the weight.

PiSSA (Meng et al., "PiSSA: Principal Singular Values and Singular Vectors Adaptation of Large
Language Models", NeurIPS 2024, https://arxiv.org/abs/2404.02948, eq. 2-4) factors
``W = U S V^T`` and starts the update at its top ``r`` components,
``A = sqrt(S_r / s) V_r^T``, ``B = U_r sqrt(S_r / s)`` (so ``s B A = U_r S_r V_r^T``), training
them while the residual ``W - s B A`` stays frozen. The division by the LoRA scaling ``s`` is
peft's (``init_lora_weights="pissa"``), which these factors equal.
:class:`~clpeft.components.lora.LoRALinear` with ``init="pissa"`` applies them.
"""

from __future__ import annotations

import torch

from clpeft.errors import UserError

__all__ = ["principal_factors"]


def principal_factors(weight: torch.Tensor, rank: int, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(A, B)`` with ``scaling * B @ A`` the best rank-``rank`` approximation of ``weight`` (float32).

    Args:
        weight: ``(out, in)``.
        rank: ``r`` (at most ``min(out, in)``).
        scaling: the LoRA scaling ``s`` of the update.
    """
    if rank > min(weight.shape):
        raise UserError(
            f"PiSSA rank {rank} exceeds the {weight.shape[0]} x {weight.shape[1]} weight's "
            f"{min(weight.shape)} singular values; lower the rank"
        )
    u, s, vh = torch.linalg.svd(weight.float(), full_matrices=False)
    root = (s[:rank] / scaling).sqrt()
    return root[:, None] * vh[:rank], u[:, :rank] * root
