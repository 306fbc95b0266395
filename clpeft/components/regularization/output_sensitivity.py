"""Memory Aware Synapses' importance: how much the output's norm moves with each parameter.

Aljundi et al., "Memory Aware Synapses: Learning what (not) to forget", ECCV 2018
(https://arxiv.org/abs/1711.09601), eq. 4-5: ``Omega_ij = 1/N sum_k | d [l2^2(F(x_k))] / d theta_ij |``,
unsupervised (no labels), on the experience's data. ``per_sample=True`` is this estimate;
``per_sample=False`` takes the absolute gradient of each *batch's* mean squared norm and averages
over batches, as Avalanche's ``MASPlugin`` and FACIL (``approach/mas.py``) do: a cheaper estimate
that depends on the batch size (the two agree for batches of one sample).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from torch.func import functional_call, grad, vmap


def output_sensitivity(model: nn.Module, inputs: Iterable[torch.Tensor], per_sample: bool = True) -> dict[str, torch.Tensor]:
    """``Omega`` of every parameter of ``model`` with ``requires_grad`` (``model``'s output: logits).

    Args:
        model: the network; its ``forward`` maps a batch to outputs.
        inputs: the batches of inputs.
        per_sample: the paper's mean over samples of ``|gradient|`` (else over batches).
    """
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}

    def squared_norm(p, x):
        return functional_call(model, p, (x,)).float().pow(2).sum(1).mean()

    def one_sample(p, x):
        return squared_norm(p, x.unsqueeze(0))

    per_batch = vmap(grad(one_sample), in_dims=(None, 0)) if per_sample else grad(squared_norm)
    importance = {n: torch.zeros_like(p) for n, p in params.items()}
    count = 0
    for x in inputs:
        grads = per_batch(params, x)
        for n, g in grads.items():
            importance[n] += g.abs().sum(0) if per_sample else g.abs()
        count += len(x) if per_sample else 1
    return {n: w / max(count, 1) for n, w in importance.items()}
