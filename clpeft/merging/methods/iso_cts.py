"""ISO-CTS: isotropic merging in the common and task-specific subspaces.

Marczak et al., "No Task Left Behind: Isotropic Model Merging with Common and Task-Specific
Subspaces", ICML 2025, https://arxiv.org/abs/2502.04959. For each weight matrix of
rank ``r = min(m, n)`` and ``T`` tasks:

1. common subspace: the top ``k`` singular vectors of ``Delta_TA = sum_t Delta_t`` (``k`` about
   ``common_space_fraction * r``, rounded so that the remaining ``r - k`` split evenly over the
   tasks, as the official code does);
2. task-specific subspaces: for each task, the top ``s = (r - k) / T`` singular vectors of its
   matrix projected off the common subspace, ``Delta_t - U_k U_k^T Delta_t``;
3. stack the ``k + T s = r`` left and right singular vectors, orthogonalise each set
   (:func:`~clpeft.merging.methods.singular.orthogonal_factor`) and give every direction the
   mean of the stacked singular values (ISO-C's flat spectrum):
   ``tau_m = alpha sigma_bar U_perp V_perp^T``.

Tensors that are not matrices are averaged and scaled by ``alpha``, as in the official
``iso_cts`` and FusionBench's ``IsotropicMergingInCommonAndTaskSubspace``; equal to the latter
(tests/reference/test_fusionbench_methods.py). Defaults: ``common_space_fraction`` 0.8 (the
paper's); ``alpha`` 1, chosen on validation data in the paper (``--search scale=...``). Where
that rounding asks for more task-specific directions than the rank holds (``r`` below about
``T / 2`` of them), clpeft rounds down instead (the official code fails there).
"""

from __future__ import annotations

from typing import Annotated

import torch
from pydantic import Field

from clpeft.merging.methods.generalized import Scale
from clpeft.merging.methods.singular import Exclude, as_matrices, orthogonal_factor
from clpeft.merging.registry import merge_method

CommonSpaceFraction = Annotated[
    float, Field(ge=0.0, le=1.0, description="k / r: share of each matrix's rank given to the common subspace of the summed task matrix")
]


def subspace_sizes(rank: int, num_tasks: int, fraction: float) -> tuple[int, int]:
    """``(k, s)``: the common subspace's size and each task's, the official code's rounding."""
    specific = round((rank - int(rank * fraction)) / num_tasks)
    if specific * num_tasks > rank:  # the official rounding overshoots the rank: round down instead
        specific -= 1
    return rank - specific * num_tasks, specific


@merge_method("iso_cts", reference_url="https://arxiv.org/abs/2502.04959")
def iso_cts(
    task_vectors: torch.Tensor,
    *,
    common_space_fraction: CommonSpaceFraction = 0.8,
    scale: Scale = 1.0,
    exclude: Exclude = (),
    shape: tuple[int, ...],
    name: str,
) -> torch.Tensor:
    """ISO-CTS: the common subspace of the summed matrix plus each task's own, with a flat spectrum (Marczak et al., ICML 2025)."""
    matrices = as_matrices(task_vectors, shape, name, exclude)
    if matrices is None:
        return task_vectors.mean(dim=0).mul_(scale)
    num_tasks, rows, columns = matrices.shape
    left, values, right = torch.linalg.svd(matrices.sum(dim=0), full_matrices=False)
    common, specific = subspace_sizes(values.shape[0], num_tasks, common_space_fraction)
    common_left = left[:, :common]
    own = matrices - common_left @ (common_left.T @ matrices)
    own_left, own_values, own_right = torch.linalg.svd(own, full_matrices=False)
    stacked_left = torch.cat([own_left[:, :, :specific].transpose(0, 1).reshape(rows, -1), common_left], dim=1)
    stacked_right = torch.cat([own_right[:, :specific, :].reshape(-1, columns), right[:common]], dim=0)
    sigma_bar = torch.cat([own_values[:, :specific].reshape(-1), values[:common]]).mean()
    merged = (orthogonal_factor(stacked_left) * (sigma_bar * scale)) @ orthogonal_factor(stacked_right)
    return merged.reshape(-1)
