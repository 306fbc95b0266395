"""EVA: start LoRA's ``A`` at the principal directions of each layer's inputs, ranks by explained variance.

EVA (Paischer et al., "One Initialization to Rule them All: Fine-tuning via Explained Variance
Adaptation", 2024, https://arxiv.org/abs/2410.07170, Sec. 3) runs data through the model, takes
the right singular vectors of every adapted layer's (centred) input activations -- their principal
components -- as the rows of ``A`` (``B`` stays zero, so the output is unchanged), and
redistributes the total rank ``sum_l r_l`` across layers: every layer offers its first
``round(rho * r_l)`` components, and the ``sum_l r_l`` components with the largest explained
variance ratios over all layers are kept. As in peft (``init_lora_weights="eva"``), a layer whose
rank changes from ``r`` to ``k`` gets ``alpha * k / r`` (the scaling stays ``alpha / r``) with
``adjust_scaling``, components are signed so that each one's largest entry is positive, and
``whiten`` divides them by the square roots of their singular values.

peft estimates the components by incremental PCA over batches until they stop moving; here the
inputs' first and second moments are accumulated over everything ``run()`` feeds the model and the
components are those of the exact PCA that the incremental estimate converges to (summed over the
ranks of a data-parallel run). A layer that gets rank 0 keeps an empty update. With ``whiten`` the
singular values are those of the inputs seen once; peft's grow with every pass its convergence
check makes over the data (``sqrt(2)`` times for a single batch), which scales its whitened rows.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from clpeft.components.lora.input_moments import input_moments
from clpeft.components.lora.layer import LoRALinear
from clpeft.errors import UserError

__all__ = ["eva_init", "principal_components", "redistribute_ranks"]


def principal_components(total: torch.Tensor, outer: torch.Tensor, count: float, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The first ``k`` principal components of inputs with sum ``total``, ``sum x x^T`` ``outer``, ``count`` rows.

    Returns:
        ``(components (k, in), singular values (k,), explained variance ratios (k,))``: the right
        singular vectors of the centred inputs, signed so that each one's largest entry is positive.
    """
    mean = total / count
    scatter = outer - count * torch.outer(mean, mean)  # X_c^T X_c
    eigenvalues, eigenvectors = torch.linalg.eigh(scatter)
    order = eigenvalues.argsort(descending=True)[:k]
    components = eigenvectors[:, order].T
    signs = torch.sign(components.gather(1, components.abs().argmax(1, keepdim=True)))
    squared = eigenvalues[order].clamp(min=0)
    return components * signs, squared.sqrt(), squared / scatter.diagonal().sum()


def redistribute_ranks(ratios: Mapping[str, torch.Tensor], budget: int) -> dict[str, int]:
    """EVA's ranks: each layer's count among the ``budget`` largest explained variance ratios of all layers."""
    names = [name for name, r in ratios.items() for _ in range(len(r))]
    values = torch.cat([r.float() for r in ratios.values()])
    ranks = dict.fromkeys(ratios, 0)
    for i in values.argsort(descending=True, stable=True)[:budget].tolist():
        ranks[names[i]] += 1
    return ranks


def eva_init(
    layers: Mapping[str, LoRALinear],
    run: Callable[[], None],
    *,
    rho: float = 2.0,
    whiten: bool = False,
    adjust_scaling: bool = True,
) -> dict[str, int]:
    """Start every layer's current update at EVA's ``A`` (``B = 0``); returns the new ranks by layer.

    Args:
        layers: ``lora`` or ``dora`` layers (their frozen updates are kept).
        run: feeds data through the model (in evaluation mode, without gradients, as peft does).
        rho: ``rho`` (>= 1): a layer may take up to ``round(rho * r)`` components.
        whiten: divide each component by the square root of its singular value.
        adjust_scaling: keep each layer's scaling ``alpha / r`` when its rank changes.
    """
    if rho < 1:
        raise UserError(f"EVA's rho must be >= 1, got {rho}")
    moments = input_moments(layers, run)
    found = {}
    for name, layer in layers.items():
        total, outer, count = moments[name]
        k = min(round(rho * layer.rank), layer.base_layer.in_features)
        if count < k:
            raise UserError(f"EVA needs at least {k} input rows for layer '{name}', got {count:g}; feed more data")
        found[name] = principal_components(total, outer, count, k)
    ranks = redistribute_ranks({name: ratio for name, (_, _, ratio) in found.items()}, sum(layer.rank for layer in layers.values()))
    for name, layer in layers.items():
        components, singular, _ = found[name]
        k = ranks[name]
        a = components[:k] / singular[:k].sqrt()[:, None] if whiten else components[:k]
        scaling = layer.scaling if adjust_scaling else layer.alpha / max(k, 1)
        layer.start_from(a.float(), scaling)
    return ranks
