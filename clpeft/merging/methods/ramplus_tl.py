"""RAM+ (tensor-local): RAM with each model's unique entries scaled up by how much it overlaps the others.

Yuan et al., "Behavior Knowledge Merge in Reinforced Agentic Models", 2026,
https://arxiv.org/abs/2601.13572 (mergekit's ``ramplus_tl``, ``mergekit/merge_methods/ram.py``).
As in :mod:`~clpeft.merging.methods.ram`, entries with ``|tau_k,i| > epsilon`` contribute, shared
entries get the mean of their contributions; model ``k``'s unique entries are multiplied by
``lambda_k = 1 + r clamp(rho_k, 0, alpha)``, ``rho_k = s_k / max(u_k, epsilon)``, where ``s_k``
and ``u_k`` count model ``k``'s contributions to shared and to unique entries of this tensor
("tensor-local": the counts are the tensor's, not the whole model's). A model that shares much
of its update has it diluted by the averaging, and its unique part compensates, by at most a
factor ``1 + r alpha``.

A model that contributes nothing to the tensor (``u_k = s_k = 0``) has no unique entries to
scale; with ``epsilon = 0`` mergekit's ``0 / 0`` makes its ``lambda_k`` NaN and the whole
merged tensor NaN, clpeft's merge ignores it (a deliberate difference). mergekit forms
``lambda_k`` in float32 whatever the weights' dtype, clpeft in the task vectors' dtype
(tests/reference/test_mergekit_more.py shows both).
"""

from __future__ import annotations

from typing import Annotated

import torch
from pydantic import Field

from clpeft.merging.methods.ram import Epsilon, contributions_, shared_mean
from clpeft.merging.registry import merge_method

Rate = Annotated[float, Field(description="r: how strongly a model's overlap scales up its unique entries")]
Cap = Annotated[float, Field(ge=0.0, description="alpha: the largest overlap ratio rho_k that counts (lambda_k <= 1 + r alpha)")]


def unique_scales(changed: torch.Tensor, unique: torch.Tensor, r: float, alpha: float, epsilon: float, dtype: torch.dtype) -> torch.Tensor:
    """``lambda_k = 1 + r clamp(s_k / max(u_k, epsilon), 0, alpha)`` per model (1 for a model that
    contributes nothing), from the contribution mask ``(K, N)`` and the unique entries ``(N,)``."""
    unique_counts = changed[:, unique].sum(dim=1)
    shared_counts = changed.sum(dim=1) - unique_counts
    rho = shared_counts.to(dtype) / unique_counts.to(dtype).clamp(min=epsilon)
    rho = torch.where(unique_counts + shared_counts > 0, rho, 0.0)
    return rho.clamp_(0.0, alpha).mul_(r).add_(1.0)


@merge_method("ramplus_tl", reference_url="https://arxiv.org/abs/2601.13572")
def ramplus_tl(task_vectors: torch.Tensor, *, r: Rate = 0.1, alpha: Cap = 0.2, epsilon: Epsilon = 1e-5) -> torch.Tensor:
    """RAM+ (tensor-local): RAM with model k's unique entries scaled by 1 + r clamp(shared_k / unique_k, 0, alpha) (Yuan et al., 2026)."""
    changed, counts = contributions_(task_vectors, epsilon)
    unique = counts == 1
    scales = unique_scales(changed, unique, r, alpha, epsilon, task_vectors.dtype)
    rescaled = scales @ task_vectors  # the one contribution of a unique entry, times its model's lambda
    return torch.where(unique, rescaled, shared_mean(task_vectors, counts))
