"""Methods defined on points rather than task vectors: where the origin of their sphere lies.

SLERP-like merges (multislerp, nuslerp, the Karcher mean) interpolate directions and norms of
vectors, so the result depends on the origin the vectors are measured from. mergekit measures
them from the base model when the merge names one (the vectors are task vectors
``tau_k = theta_k - theta_0``) and from zero otherwise (the vectors are the weights ``theta_k``).
clpeft always has a base, so ``origin`` chooses: ``"base"`` (mergekit with ``base_model``) or
``"zero"`` (mergekit without it; the base then only anchors the engine's ``theta_0 + delta``).
"""

from __future__ import annotations

from typing import Annotated, Literal

import torch
from pydantic import Field

__all__ = ["Origin", "from_points_", "to_points_"]

Origin = Annotated[
    Literal["base", "zero"],
    Field(description="interpolate task vectors (origin at the base, mergekit with base_model) or the weights (origin zero)"),
]


def to_points_(task_vectors: torch.Tensor, base: torch.Tensor, origin: str) -> torch.Tensor:
    """The ``(K, N)`` vectors to interpolate, in place: the task vectors, or ``theta_k = theta_0 + tau_k``."""
    return task_vectors if origin == "base" else task_vectors.add_(base)


def from_points_(merged: torch.Tensor, base: torch.Tensor, origin: str) -> torch.Tensor:
    """The merged task vector from an interpolated point, in place (``merged`` is the method's own tensor)."""
    return merged if origin == "base" else merged.sub_(base)
