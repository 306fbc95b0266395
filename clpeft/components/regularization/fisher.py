"""EWC's importance: the diagonal empirical Fisher information, and the penalty it weights.

Kirkpatrick et al., "Overcoming catastrophic forgetting in neural networks", PNAS 2017
(https://arxiv.org/abs/1612.00796), eq. 3: ``L = L_B + sum_i lambda/2 F_i (theta_i - theta*_A,i)^2``.
Online EWC (Schwarz et al., "Progress & Compress", ICML 2018, https://arxiv.org/abs/1805.06370)
keeps one running term: ``F* <- gamma F* + F_new`` anchored at the latest parameters.

The penalty itself, ``sum_i F_i (theta_i - theta*_i)^2``, is
:class:`~clpeft.components.regularization.quadratic_penalty.QuadraticPenalty` (shared with SI and MAS).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn
from torch.func import functional_call, grad, vmap

# EWC's name for the penalty EWC, SI and MAS share (the Fisher is its importance); eata uses it too.
from clpeft.components.regularization.quadratic_penalty import QuadraticPenalty as FisherPenalty

__all__ = ["FisherPenalty", "empirical_fisher"]


def empirical_fisher(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> dict[str, torch.Tensor]:
    """Diagonal empirical Fisher ``E[(d log p(y|x) / d theta)^2]`` with per-sample gradients.

    Args:
        model: a module whose ``forward`` gives logits; only parameters with ``requires_grad``
            are included.
        batches: ``(x, y)`` pairs.
        loss_fn: ``(logits, y) -> scalar`` negative log-likelihood of one sample.
    """
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}

    def sample_loss(p, x, y):
        return loss_fn(functional_call(model, p, (x.unsqueeze(0),)), y.unsqueeze(0))

    per_sample = vmap(grad(sample_loss), in_dims=(None, 0, 0))
    fisher = {n: torch.zeros_like(p) for n, p in params.items()}
    count = 0
    for x, y in batches:
        grads = per_sample(params, x, y)
        for n, g in grads.items():
            fisher[n] += g.pow(2).sum(0)
        count += len(y)
    return {n: f / max(count, 1) for n, f in fisher.items()}
