"""O-LoRA's regularisers: the current LoRA's ``A`` orthogonal to the past tasks' ``A``, and an L2 term.

Wang et al., "Orthogonal Subspace Learning for Language Model Continual Learning", EMNLP 2023
Findings (https://arxiv.org/abs/2310.14152), section 3.3: each task trains a new LoRA while the
past tasks' LoRAs stay frozen in the model (:meth:`LoRALinear.new_update <clpeft.components.lora.LoRALinear.new_update>`
with ``old="freeze"``: their ``A`` rows are the layer's ``frozen_A``). With ``A_i`` a past task's and
``A_t`` the current task's down-projection (rows are components here, ``A: (r, in)``), the overlap
``O_{i,t} = A_i A_t^T`` (the paper's ``A_i^T A_t`` with column components) should vanish:

    L_orth = sum_layers sum_{i<t} sum_{j,k} |O_{i,t}[j, k]|        (the official code)
    L_orth = sum_layers sum_{i<t} sum_{j,k} O_{i,t}[j, k]^2        (the paper's eq. 5, squared=True)

Summed over past tasks, both equal the same entry-wise sum over ``frozen_A @ A_t^T``. The official
code (``uie_trainer_lora.py``, also TRACE's ``O_LoRA``) adds ``lambda_2`` times
``sum ||theta||_2`` over the current LoRA's ``A`` and ``B``, each tensor's (unsquared) Frobenius norm.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from clpeft.components.lora.layer import LoRALinear


def orthogonality_loss(layers: Iterable[LoRALinear], squared: bool = False) -> torch.Tensor:
    """``L_orth``: the entries of ``frozen_A @ lora_A^T`` summed as absolute values (or squares) over ``layers``."""
    total = torch.zeros(())
    for layer in layers:
        if layer.frozen_rank:
            overlap = layer.frozen_A @ layer.lora_A.T
            total = total.to(overlap) + (overlap.pow(2) if squared else overlap.abs()).sum()
    return total


def current_l2(layers: Iterable[LoRALinear]) -> torch.Tensor:
    """``sum ||theta||_2`` over the current update's ``A`` and ``B`` of every layer (each tensor's Frobenius norm)."""
    total = torch.zeros(())
    for layer in layers:
        total = total.to(layer.lora_A) + layer.lora_A.norm() + layer.lora_B.norm()
    return total
