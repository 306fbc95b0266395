"""Separate query, key and value projections for ViTs that fuse them into one ``qkv`` linear.

timm's ViTs compute ``[q; k; v] = W_qkv x + b_qkv`` with one ``nn.Linear(d, 3d)``, so a LoRA
target can only adapt the three together. Papers adapt them separately: LoRA (Hu et al., ICLR
2022, https://arxiv.org/abs/2106.09685, Section 7.1) adapts ``W_q`` and ``W_v``; InfLoRA (Liang
& Li, CVPR 2024) adapts ``W_k`` and ``W_v``. :func:`split_qkv` replaces every fused ``qkv`` by a
:class:`SplitQKV` whose ``q``, ``k`` and ``v`` children hold the three row blocks of the
weights, so ``targets: [qkv.k, qkv.v]`` adapts exactly those. The output is the concatenation of
the three projections: the same numbers as the fused layer, up to floating-point summation order.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["SplitQKV", "split_qkv"]


class SplitQKV(nn.Module):
    """``cat([q(x), k(x), v(x)], -1)``: a fused ``nn.Linear(d, 3d)`` as three ``nn.Linear(d, d)``."""

    def __init__(self, fused: nn.Linear):
        super().__init__()
        if fused.out_features % 3:
            raise ValueError(f"a fused qkv projection has 3 x d outputs, got {fused.out_features}")
        d = fused.out_features // 3
        for i, name in enumerate("qkv"):
            part = nn.Linear(fused.in_features, d, bias=fused.bias is not None, device=fused.weight.device, dtype=fused.weight.dtype)
            with torch.no_grad():
                part.weight.copy_(fused.weight[i * d : (i + 1) * d])
                if fused.bias is not None:
                    part.bias.copy_(fused.bias[i * d : (i + 1) * d])
            part.weight.requires_grad_(fused.weight.requires_grad)
            if fused.bias is not None:
                part.bias.requires_grad_(fused.bias.requires_grad)
            setattr(self, name, part)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.q(x), self.k(x), self.v(x)], dim=-1)


def split_qkv(model: nn.Module) -> int:
    """Replace every ``nn.Linear`` named ``qkv`` in ``model`` by a :class:`SplitQKV`; returns how many."""
    fused = [
        (parent, name)
        for parent in model.modules()
        for name, child in parent.named_children()
        if name == "qkv" and isinstance(child, nn.Linear)
    ]
    for parent, name in fused:
        setattr(parent, name, SplitQKV(getattr(parent, name)))
    return len(fused)
