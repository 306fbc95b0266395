"""TSV-Merge: merge each layer's low-rank task singular vectors after decorrelating them.

Gargiulo et al., "Task Singular Vectors: Reducing Task Interference in Model Merging", CVPR 2025,
https://arxiv.org/abs/2412.00081 (TSV-Merge). For each weight matrix, with ``T`` task matrices
``Delta_t = U_t Sigma_t V_t^T`` of rank ``r = min(m, n)``:

1. compress: keep each task's top ``k = floor(r / T)`` singular triplets;
2. stack: ``U = [U_1,k ... U_T,k]`` (``m x Tk``), ``Sigma = diag(Sigma_1,k ... Sigma_T,k)``,
   ``V = [V_1,k ... V_T,k]``;
3. decorrelate: replace ``U`` and ``V`` by their orthogonal (Procrustes) factors
   ``U_perp = P_U Q_U^T`` (:func:`~clpeft.merging.methods.singular.orthogonal_factor`);
4. ``tau_m = alpha U_perp Sigma V_perp^T``.

Tensors that are not matrices are averaged and scaled by ``alpha`` too (the official
``compute_and_sum_svd_mem_reduction``; FusionBench's ``TaskSingularVectorMerging``). Equal to
FusionBench's (tests/reference/test_fusionbench_methods.py), except that ``k`` is the integer
``r // T`` where the official ``int(r * (1 / T))`` can round one below it (``r = T = 49``: 0).
Default ``alpha`` 1: the official and FusionBench's value.
"""

from __future__ import annotations

import torch

from clpeft.merging.methods.generalized import Scale
from clpeft.merging.methods.singular import Exclude, as_matrices, orthogonal_factor
from clpeft.merging.registry import merge_method


@merge_method("tsv", reference_url="https://arxiv.org/abs/2412.00081")
def tsv(task_vectors: torch.Tensor, *, scale: Scale = 1.0, exclude: Exclude = (), shape: tuple[int, ...], name: str) -> torch.Tensor:
    """TSV-Merge: per matrix, stack each task's top r/T singular vectors, orthogonalise, recombine (Gargiulo et al., CVPR 2025)."""
    matrices = as_matrices(task_vectors, shape, name, exclude)
    if matrices is None:
        return task_vectors.mean(dim=0).mul_(scale)
    num_tasks, rows, columns = matrices.shape
    left, values, right = torch.linalg.svd(matrices, full_matrices=False)
    k = values.shape[1] // num_tasks
    stacked_left = left[:, :, :k].transpose(0, 1).reshape(rows, num_tasks * k)
    stacked_right = right[:, :k, :].reshape(num_tasks * k, columns)
    merged = (orthogonal_factor(stacked_left) * values[:, :k].reshape(-1)) @ orthogonal_factor(stacked_right)
    return merged.mul_(scale).reshape(-1)
