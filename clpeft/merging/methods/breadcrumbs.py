"""Model Breadcrumbs: drop each task vector's smallest and its largest (outlier) entries, then merge.

Davari and Belilovsky, "Model Breadcrumbs: Scaling Multi-Task Model Merging with Sparse Masks",
ECCV 2024, https://arxiv.org/abs/2312.06795, Section 3: per layer, the entries of each task
vector are ranked by magnitude; the top ``beta`` fraction (outliers) and the bottom ``gamma``
fraction are masked out, and the masked task vectors are added to the base with ``alpha``.
mergekit's ``breadcrumbs`` (``magnitude_outliers`` in ``mergekit/sparsify.py``) parametrises it
as clpeft does: ``gamma`` the fraction removed from the top, ``density`` the fraction kept
(``floor(density N)`` entries just below the ``floor(gamma N)`` largest; with ``density >= 1`` the
task vector is kept whole), ``rescale`` matching the kept entries' L1 norm to the task vector's.
The masked task vectors are then summed (``consensus: sum``, mergekit's ``breadcrumbs``) or
TIES-merged (``consensus: ties``, mergekit's ``breadcrumbs_ties``) by
:func:`~clpeft.merging.methods.generalized.combine`, whose conventions (sign elected on the
unweighted mass, weights multiplying ``scale``) are clpeft's for the whole family; with equal
weights the result equals mergekit's, and unequal weights elect other signs
(tests/reference/test_mergekit_methods.py, docs/merging.md).

Defaults: ``density`` 0.9 and ``gamma`` 0.01 (clpeft's choice: mergekit's ``gamma`` and a light
mask; mergekit's ``density`` default 1 masks nothing and turns the method into task arithmetic;
the paper tunes both per setting).

Equal magnitudes are ranked by position (a stable sort), so a merge is the same on every run
and device; mergekit's unstable sort may keep other entries among equal magnitudes (common in
bf16 task vectors), never another number of them.
"""

from __future__ import annotations

from typing import Annotated

import torch
from pydantic import Field

from clpeft.merging.methods.generalized import Consensus, Disjoint, Scale, Weights, combine, task_coefficients
from clpeft.merging.registry import merge_method

Density = Annotated[float, Field(ge=0.0, le=1.0, description="fraction of each task vector kept (1 - beta - gamma in the paper)")]
Gamma = Annotated[float, Field(ge=0.0, le=1.0, description="beta in the paper: fraction of the largest magnitudes removed as outliers")]
Rescale = Annotated[bool, Field(description="scale the kept entries so each task vector keeps its L1 norm (mergekit's rescale)")]

_RESCALE_EPS = 1e-7  # mergekit's: norms below it are not rescaled


def rescale_l1_(task_vectors: torch.Tensor, original_l1: torch.Tensor) -> torch.Tensor:
    """Scale each sparsified row back to its L1 norm before sparsification, in place (rows whose
    norm before or after is below 1e-7 stay as they are, as in mergekit)."""
    kept_l1 = task_vectors.abs().sum(dim=1)
    usable = (original_l1 >= _RESCALE_EPS) & (kept_l1 >= _RESCALE_EPS)
    return task_vectors.mul_(torch.where(usable, original_l1 / torch.where(usable, kept_l1, 1.0), 1.0)[:, None])


def keep_magnitude_band_(task_vectors: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Keep, in each row, the ``floor(density N)`` entries ranked just below its ``floor(gamma N)``
    largest magnitudes; zero the rest, in place."""
    n = task_vectors.shape[1]
    kept, top = int(density * n), int(gamma * n)
    bottom = max(0, n - kept - top)
    for row in task_vectors:
        order = row.abs().sort(stable=True).indices
        row[order[:bottom]] = 0
        row[order[bottom + kept :]] = 0
    return task_vectors


@merge_method("breadcrumbs", reference_url="https://arxiv.org/abs/2312.06795")
def breadcrumbs(
    task_vectors: torch.Tensor,
    *,
    density: Density = 0.9,
    gamma: Gamma = 0.01,
    rescale: Rescale = False,
    consensus: Consensus = "sum",
    disjoint: Disjoint = "sum",
    scale: Scale = 1.0,
    weights: Weights = None,
) -> torch.Tensor:
    """Model Breadcrumbs: mask each task vector's smallest and largest magnitudes, then sum or TIES-merge (Davari & Belilovsky, ECCV 2024)."""
    if density < 1.0:
        original_l1 = task_vectors.abs().sum(dim=1) if rescale else None
        keep_magnitude_band_(task_vectors, density, gamma)
        if rescale:
            rescale_l1_(task_vectors, original_l1)
    return combine(task_vectors, task_coefficients(task_vectors, scale, weights), consensus, disjoint)
