"""Shared pieces of the merge methods that work on each weight matrix's singular vectors.

TSV-Merge, ISO-C and ISO-CTS treat a 2-D tensor (a linear layer's weight) as a matrix and
merge its singular vectors and values; every other tensor (biases, norms, convolution kernels,
and 2-D tensors named in ``exclude``) is averaged, as their official code does
(``compute_and_sum_svd_mem_reduction`` of Gargiulo et al., ``iso_c`` / ``iso_cts`` of
Marczak et al., both also in FusionBench).
"""

from __future__ import annotations

from fnmatch import fnmatchcase
from typing import Annotated

import torch
from pydantic import Field

__all__ = ["Exclude", "as_matrices", "orthogonal_factor"]

Exclude = Annotated[
    tuple[str, ...],
    Field(
        description="globs of 2-D tensors averaged instead of merged as matrices (FusionBench's exclude_keys, e.g. CLIP's text_projection)"
    ),
]


def as_matrices(task_vectors: torch.Tensor, shape: tuple[int, ...], name: str, exclude: tuple[str, ...]) -> torch.Tensor | None:
    """The ``(K, m, n)`` view of a 2-D tensor's task vectors; None for any other rank or an excluded name."""
    if len(shape) != 2 or any(fnmatchcase(name, pattern) for pattern in exclude):
        return None
    return task_vectors.view(task_vectors.shape[0], *shape)


def orthogonal_factor(matrix: torch.Tensor) -> torch.Tensor:
    """The nearest matrix with orthonormal columns (or rows), ``P Q^T`` of ``matrix = P Sigma Q^T``.

    The orthogonal Procrustes / polar factor both papers use to decorrelate singular vectors
    stacked from several tasks (TSV-Merge, ISO-CTS).
    """
    left, _, right = torch.linalg.svd(matrix, full_matrices=False)
    return left @ right
