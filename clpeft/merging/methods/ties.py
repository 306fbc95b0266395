"""TIES-Merging: trim, elect sign, disjoint merge.

Yadav et al., "TIES-Merging: Resolving Interference When Merging Models", NeurIPS 2023,
https://arxiv.org/abs/2306.01708, Algorithm 1:

1. Trim: keep the top-``k`` fraction of each task vector by magnitude (``density`` here);
2. Elect: per entry, the sign with the larger total mass, ``sign(sum_k tau_k)``;
3. Disjoint merge: average only the entries that agree with the elected sign;
4. ``theta = theta_0 + lambda * tau_m``.

Trim scope. The official code (``ties-merging/src/utils/merge_utils.py``, and AdaMerging's
``ties_merging_utils.py``) flattens the whole model into one vector per task and keeps its top
``k`` (``trim_scope: model``, the default, streamed exactly by
:mod:`~clpeft.merging.methods.model_trim`); peft and mergekit trim each tensor on its own
(``trim_scope: tensor``; with ``trim: topk`` the result then equals ``peft.utils.merge_utils.ties``).
Both keep ``floor(density * N)`` entries of each task vector (``N`` the whole model's or the
tensor's size) plus any tied with the last; the official ``topk_values_mask`` keeps one more
(its ``kthvalue(N - floor(density * N))`` cut-off is the ``floor(density * N) + 1``-th largest
entry), one entry per task in a whole model, a deliberate difference.

Defaults. ``density`` 0.2 is the official ``topk20`` (TIES README; ``K = 20`` in AdaMerging's
``main_ties_merging.py``). ``scale`` (lambda) 1 is the paper's value without a validation set;
the official command searches lambda in 0.8-2.5 on validation data (``linear+0.8+2.51+0.1``, the
TIES README): ``clpeft merge --search scale=0.8:2.5:0.1 --on CONFIG`` does the same.
AdaMerging's TIES baseline instead sums the agreeing entries (``disjoint: sum``) at lambda 0.3.
The zero-mass sign convention is documented in :func:`~clpeft.merging.methods.generalized.combine`.

Methods built on task arithmetic's multi-task vector ``tau_MTL = sum_t tau_t`` (consensus
merging, LiNeS) take TIES' merged vector instead with ``merge: ties`` and TIES' keys
(:func:`multi_task_vector`, :func:`model_thresholds`), as their papers' official code does.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any, Literal

import torch
from pydantic import Field

from clpeft.errors import UserError
from clpeft.merging import fused_cpu
from clpeft.merging.methods.generalized import Disjoint, Scale, Weights, combine, task_coefficients
from clpeft.merging.methods.model_trim import KthLargestMagnitude
from clpeft.merging.methods.sparsify import Trim, row_thresholds, shrink_lambdas, trim_below_, trim_by_magnitude_
from clpeft.merging.registry import ModelShape, merge_method

Density = Annotated[float, Field(ge=0.0, le=1.0, description="k: fraction of each task vector kept by magnitude")]
TrimScope = Annotated[
    Literal["model", "tensor"],
    Field(description="trim each task vector over the whole model (the official code) or each tensor apart (peft)"),
]
MultiTask = Annotated[
    Literal["task_arithmetic", "ties"],
    Field(description="tau_MTL: task arithmetic's sum, or TIES' merged vector (density, trim, trim_scope, disjoint)"),
]


def model_thresholds(params: Mapping[str, Any], shape: ModelShape) -> KthLargestMagnitude | None:
    """Pass 1 of ``trim_scope: model``: each task's k-th largest magnitude over the whole model."""
    if params["trim_scope"] == "tensor":
        return None
    if params["trim"] == "topk":
        raise UserError(
            "trim: topk keeps exactly k entries of each tensor (peft's convention) and needs trim_scope: tensor; "
            "with trim_scope: model use trim: threshold",
            key="parameters.trim",
        )
    return KthLargestMagnitude(int(params["density"] * shape.numel), shape)


@merge_method("ties", reference_url="https://arxiv.org/abs/2306.01708", model_statistic=model_thresholds)
def ties(
    task_vectors: torch.Tensor,
    *,
    density: Density = 0.2,
    scale: Scale = 1.0,
    weights: Weights = None,
    trim: Trim = "threshold",
    trim_scope: TrimScope = "model",
    disjoint: Disjoint = "mean",
    model_statistic: torch.Tensor | None = None,
) -> torch.Tensor:
    """TIES-Merging: trim to the top-k magnitudes, elect signs, disjoint mean (Yadav et al., NeurIPS 2023).

    ``model_statistic`` holds the whole model's per-task thresholds (``trim_scope: model``, given
    by the engine); without it the tensor is trimmed on its own (a direct call on one tensor
    treats that tensor as the whole model).
    """
    coefficients = task_coefficients(task_vectors, scale, weights)
    if fused_cpu.supports_election(task_vectors):  # trim, elect and merge in one compiled pass
        thresholds = row_thresholds(task_vectors, density, trim) if model_statistic is None else model_statistic
        if thresholds is not None:
            lambdas = shrink_lambdas(thresholds, task_vectors.dtype)
            return fused_cpu.ties_elect(task_vectors, coefficients.tolist(), disjoint == "mean", lambdas)
    if model_statistic is None:
        trim_by_magnitude_(task_vectors, density, trim)
    else:
        trim_below_(task_vectors, model_statistic)
    return combine(task_vectors, coefficients, "ties", disjoint)


def multi_task_vector(
    task_vectors: torch.Tensor,
    merge: MultiTask,
    *,
    density: float,
    trim: Trim,
    disjoint: Disjoint,
    thresholds: torch.Tensor | None,
) -> torch.Tensor:
    """``tau_MTL``: ``sum_t tau_t`` (``merge: task_arithmetic``) or TIES' merged vector at lambda 1
    (``merge: ties``; ``thresholds`` from :func:`model_thresholds`, None to trim this tensor alone)."""
    if merge == "task_arithmetic":
        return task_vectors.sum(dim=0)
    return ties(task_vectors, density=density, trim=trim, disjoint=disjoint, model_statistic=thresholds)
