"""ISO-C: isotropic merging in the common subspace, a flat spectrum for the summed task matrix.

Marczak et al., "No Task Left Behind: Isotropic Model Merging with Common and Task-Specific
Subspaces", ICML 2025, https://arxiv.org/abs/2502.04959. For each weight matrix,
the task-arithmetic sum ``Delta_TA = sum_t Delta_t = U Sigma V^T`` keeps its singular vectors
while every singular value is replaced by their mean:

    tau_m = alpha sigma_bar U V^T,    sigma_bar = (1 / r) sum_i sigma_i,

so every direction of the common subspace is scaled alike. Tensors that are not matrices are
averaged (``mean_t tau_t``) and scaled by ``alpha``, as the official ``iso_c`` and FusionBench's
``IsotropicMergingInCommonSubspace`` do; equal to the latter
(tests/reference/test_fusionbench_methods.py). ``alpha`` is chosen on validation data in the
paper; the default 1 keeps the summed matrix's mean singular value
(``clpeft merge --search scale=0.5:2.0:0.1 --on CONFIG`` searches it).
"""

from __future__ import annotations

import torch

from clpeft.merging.methods.generalized import Scale
from clpeft.merging.methods.singular import Exclude, as_matrices
from clpeft.merging.registry import merge_method


@merge_method("iso_c", reference_url="https://arxiv.org/abs/2502.04959")
def iso_c(task_vectors: torch.Tensor, *, scale: Scale = 1.0, exclude: Exclude = (), shape: tuple[int, ...], name: str) -> torch.Tensor:
    """ISO-C: the summed task matrix with its singular values flattened to their mean (Marczak et al., ICML 2025)."""
    matrices = as_matrices(task_vectors, shape, name, exclude)
    if matrices is None:
        return task_vectors.mean(dim=0).mul_(scale)
    left, values, right = torch.linalg.svd(matrices.sum(dim=0), full_matrices=False)
    return (left * (values.mean() * scale)).matmul(right).reshape(-1)
