"""Stochastic restoration of source weights (CoTTA).

Wang et al., "Continual Test-Time Domain Adaptation", CVPR 2022
(https://arxiv.org/abs/2203.13591), eq. 5-6: after every update, each element of every
trainable weight tensor is reset to its source value with probability ``p``:

    M ~ Bernoulli(p),   W <- M * W_0 + (1 - M) * W

which keeps a continually adapted model from drifting arbitrarily far from the source model.
"""

from __future__ import annotations

import torch
from torch import nn


class StochasticRestore:
    """Reset each trainable weight element to its source value with probability ``p``.

    Args:
        p: restore probability (0.01 in the paper). ``p = 1`` returns the source weights
            bitwise; ``p = 0`` leaves the model untouched.
    """

    def __init__(self, p: float):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"restore probability must lie in [0, 1], got {p}")
        self.p = float(p)

    @torch.no_grad()
    def __call__(self, model: nn.Module, source: nn.Module | dict[str, torch.Tensor], generator: torch.Generator | None = None) -> int:
        """Restore elements of ``model``'s trainable parameters from ``source`` (a module with
        the same parameter names, or a name -> tensor dict). Returns how many were restored."""
        if self.p == 0.0:
            return 0
        reference = dict(source.named_parameters()) if isinstance(source, nn.Module) else source
        restored = 0
        for name, param in model.named_parameters():
            if not param.requires_grad:
                continue
            if name not in reference:
                raise KeyError(f"the source has no parameter '{name}'")
            src = reference[name]
            if self.p == 1.0:
                param.copy_(src)
                restored += param.numel()
                continue
            mask = torch.rand(param.shape, generator=generator, device=param.device) < self.p
            param.copy_(torch.where(mask, src, param))
            restored += int(mask.sum())
        return restored
