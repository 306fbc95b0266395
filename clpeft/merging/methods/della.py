"""DELLA: drop task-vector entries with probabilities that grow with their magnitude, then merge.

Deep, Bhardwaj, Ghosal and Poria, "DELLA-Merging: Reducing Interference in Model Merging through
Magnitude-Based Sampling", 2024, https://arxiv.org/abs/2406.11617, Section 3 (MagPrune): the
entries of each row of a task vector are ranked by magnitude, and entry ``i`` is kept with
probability ``p_i = (density - epsilon) + 2 epsilon r_i / (n - 1)`` (``r_i`` its rank from 0, the
smallest, to ``n - 1``), so the probabilities span ``density +- epsilon`` and average ``density``
(mergekit's ``della_magprune``; a one-entry row is kept with probability ``density``). The kept
entries are rescaled (``rescale``: ``l1`` matches each task vector's L1 norm as mergekit does,
``probability`` divides each entry by its ``p_i`` as the paper does, ``none``), then merged by
TIES' sign election and disjoint mean (``consensus: ties``, mergekit's ``della``) or summed
(``consensus: sum``, mergekit's ``della_linear``) by
:func:`~clpeft.merging.methods.generalized.combine`, with clpeft's family conventions (see
:mod:`~clpeft.merging.methods.breadcrumbs` and docs/merging.md).

Rows are a tensor's output rows (the first axis; a 1-D tensor is one row), as in mergekit for
1-D and 2-D tensors (mergekit ranks a convolution kernel along its second axis). The draws
come from the engine's per-tensor generator, one row of models at a time, in float32 as
mergekit draws them. Defaults: ``epsilon`` 0.15 is mergekit's; ``density`` 0.7 is clpeft's
choice (mergekit's default 1 drops nothing).
"""

from __future__ import annotations

from typing import Annotated, Literal

import torch
from pydantic import Field

from clpeft.errors import UserError
from clpeft.merging.methods.breadcrumbs import rescale_l1_
from clpeft.merging.methods.generalized import Consensus, Disjoint, Scale, Weights, combine, task_coefficients
from clpeft.merging.registry import merge_method

Density = Annotated[float, Field(ge=0.0, le=1.0, description="mean keep probability of each entry (1 - p in the paper)")]
Epsilon = Annotated[float, Field(ge=0.0, description="epsilon: keep probabilities span density +- epsilon by magnitude rank")]
Rescale = Annotated[
    Literal["l1", "probability", "none"],
    Field(description="rescale the kept entries: to the task vector's L1 norm (mergekit), by 1 / p_i (the paper), or not"),
]


def keep_probabilities(magnitudes: torch.Tensor, density: float, epsilon: float) -> torch.Tensor:
    """MagPrune's ``p_i`` for each entry of ``(..., n)`` magnitudes, by rank along the last axis (float32)."""
    n = magnitudes.shape[-1]
    ranks = magnitudes.argsort(dim=-1, stable=True).argsort(dim=-1).to(torch.float32)
    spread = ranks.div_(n - 1) if n > 1 else ranks.fill_(0.5)
    return spread.mul_(2 * epsilon).add_(density - epsilon)


@merge_method("della", reference_url="https://arxiv.org/abs/2406.11617")
def della(
    task_vectors: torch.Tensor,
    *,
    density: Density = 0.7,
    epsilon: Epsilon = 0.15,
    rescale: Rescale = "l1",
    consensus: Consensus = "ties",
    disjoint: Disjoint = "mean",
    scale: Scale = 1.0,
    weights: Weights = None,
    generator: torch.Generator | None = None,
    shape: tuple[int, ...],
) -> torch.Tensor:
    """DELLA: keep entries with magnitude-ranked probabilities, rescale, then TIES-merge or sum (Deep et al., 2024)."""
    if density <= 0.0:
        task_vectors.zero_()
    elif density < 1.0:
        if not (0.0 < density - epsilon and density + epsilon < 1.0):
            raise UserError(
                f"density +- epsilon must lie inside (0, 1), got {density} +- {epsilon}; lower epsilon", key="parameters.epsilon"
            )
        k = task_vectors.shape[0]
        rows = task_vectors.view(k, shape[0] if len(shape) >= 2 else 1, -1)
        probabilities = keep_probabilities(rows.abs(), density, epsilon)
        original_l1 = task_vectors.abs().sum(dim=1) if rescale == "l1" else None
        for row, p in zip(rows, probabilities):
            row.mul_(torch.bernoulli(p, generator=generator))
        if rescale == "l1":
            rescale_l1_(task_vectors, original_l1)
        elif rescale == "probability":
            rows.div_(probabilities)
    return combine(task_vectors, task_coefficients(task_vectors, scale, weights), consensus, disjoint)
