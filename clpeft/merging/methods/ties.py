"""TIES-Merging: trim, elect sign, disjoint merge.

Yadav et al., "TIES-Merging: Resolving Interference When Merging Models", NeurIPS 2023,
https://arxiv.org/abs/2306.01708, Algorithm 1:

1. Trim: keep the top-``k`` fraction of each task vector by magnitude (``density`` here);
2. Elect: per entry, the sign with the larger total mass, ``sign(sum_k tau_k)``;
3. Disjoint merge: average only the entries that agree with the elected sign;
4. ``theta = theta_0 + lambda * tau_m``.

The conventions for ties at the trim cut-off and for a zero total mass are documented in
:mod:`~clpeft.merging.methods.sparsify` and :func:`~clpeft.merging.methods.generalized.combine`;
with ``trim="topk"`` the result equals ``peft.utils.merge_utils.ties``.
"""

from __future__ import annotations

from typing import Annotated

import torch
from pydantic import Field

from clpeft.merging.methods.generalized import Scale, Weights, combine, task_coefficients
from clpeft.merging.methods.sparsify import Trim, trim_by_magnitude_
from clpeft.merging.registry import merge_method

Density = Annotated[float, Field(ge=0.0, le=1.0, description="k: fraction of each task vector kept by magnitude")]


@merge_method("ties", reference_url="https://arxiv.org/abs/2306.01708")
def ties(
    task_vectors: torch.Tensor,
    *,
    density: Density = 0.2,
    scale: Scale = 1.0,
    weights: Weights = None,
    trim: Trim = "threshold",
) -> torch.Tensor:
    """TIES-Merging: trim to the top-k magnitudes, elect signs, disjoint mean (Yadav et al., NeurIPS 2023)."""
    trim_by_magnitude_(task_vectors, density, trim)
    return combine(task_vectors, task_coefficients(task_vectors, scale, weights), "ties")
