"""The first and second moments of every adapted layer's inputs over what a model is fed.

What EVA's principal components (Paischer et al. 2024, https://arxiv.org/abs/2410.07170, Sec. 3)
and InfLoRA's and GPM's input covariances (Liang & Li, CVPR 2024, https://arxiv.org/abs/2404.00228)
are computed from: forward pre-hooks on the layers accumulate, in float64, the sum of the
inputs, the sum of their outer products and their count, summed over the ranks of a
data-parallel run.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from clpeft.components.lora.layer import LoRALinear
from clpeft.distributed import current


@torch.no_grad()
def input_moments(layers: Mapping[str, LoRALinear], run: Callable[[], None]) -> dict[str, tuple[torch.Tensor, torch.Tensor, float]]:
    """``(sum x, sum x x^T, count)`` of every layer's inputs (float64) over what ``run()`` feeds the model."""
    moments = {}
    for name, layer in layers.items():
        n = layer.base_layer.in_features
        device = layer.base_layer.weight.device
        moments[name] = [
            torch.zeros(n, dtype=torch.float64, device=device),
            torch.zeros(n, n, dtype=torch.float64, device=device),
            torch.zeros((), dtype=torch.float64),
        ]

    def hook(name: str):
        def accumulate(_module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            total, outer, count = moments[name]
            total += x.sum(0)
            outer.addmm_(x.T, x)
            count += x.shape[0]

        return accumulate

    handles = [layer.register_forward_pre_hook(hook(name)) for name, layer in layers.items()]
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
    world = current()
    for parts in moments.values():
        for t in parts:
            world.all_reduce_sum(t)
    return {name: (total, outer, float(count)) for name, (total, outer, count) in moments.items()}
