"""NuSLERP: SLERP of two models with weights, per tensor, per row or per column.

mergekit's ``nuslerp`` (Goddard, arcee-ai/mergekit, ``docs/merge_methods.md``; no paper), the
SLERP of Shoemake, "Animating rotation with quaternion curves", SIGGRAPH 1985,
https://doi.org/10.1145/325165.325242, between two models' vectors ``x_1, x_2`` (task vectors
or weights, :mod:`~clpeft.merging.methods.weight_space`) at ``t = w_2 / (w_1 + w_2)`` (0.5 when
the weights sum to about 0). Unlike ``slerp`` the endpoints are the two fine-tuned models, and
the vectors are each whole tensor (``flatten``, the default) or, with ``flatten: false``, the
slices along its last axis (its rows, for a Linear weight) or with ``row_wise`` along its first
axis (its columns). Per vector: ``cos Omega`` of the unit vectors (norms clamped at 1e-7),
``theta = (sin((1 - t) Omega) x_1 + sin(t Omega) x_2) / sin Omega``, linear interpolation where
``1 - cos^2 Omega <= eps^2`` (``eps`` 1e-8, mergekit's). Equal to mergekit's ``nuslerp``
(tests/reference/test_mergekit_methods.py).
"""

from __future__ import annotations

import torch

from clpeft.errors import UserError
from clpeft.merging.methods.generalized import task_coefficients
from clpeft.merging.methods.linear import ModelWeights
from clpeft.merging.methods.weight_space import Origin, from_points_, to_points_
from clpeft.merging.registry import merge_method

_EPS = 1e-8  # mergekit's colinearity tolerance, 1 - cos^2 <= eps^2


def _slerp_along_last_axis(t: float, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
    """SLERP of every vector along the last axis of ``x1`` and ``x2`` (a new tensor)."""
    u1, u2 = (x / torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp(min=1e-7) for x in (x1, x2))
    cos_omega = (u1 * u2).sum(dim=-1, keepdim=True).clamp(-1.0, 1.0)
    colinear = (1 - cos_omega.square()) <= _EPS**2
    omega = torch.acos(torch.where(colinear, 0.0, cos_omega))
    spherical = (torch.sin((1 - t) * omega) * x1 + torch.sin(t * omega) * x2) / torch.sin(omega)
    return torch.where(colinear, (1 - t) * x1 + t * x2, spherical)


@merge_method("nuslerp", reference_url="https://github.com/arcee-ai/mergekit/blob/main/docs/merge_methods.md")
def nuslerp(
    task_vectors: torch.Tensor,
    *,
    weights: ModelWeights = None,
    flatten: bool = True,
    row_wise: bool = False,
    origin: Origin = "base",
    base: torch.Tensor,
    shape: tuple[int, ...],
) -> torch.Tensor:
    """SLERP between two models at t = w_2 / (w_1 + w_2), per tensor, row or column (mergekit's nuslerp)."""
    if task_vectors.shape[0] != 2:
        raise UserError(f"nuslerp interpolates between exactly two fine-tuned models, got {task_vectors.shape[0]}", key="models")
    w1, w2 = task_coefficients(task_vectors, 1.0, weights).tolist()
    t = 0.5 if abs(w1 + w2) < 1e-6 else w2 / (w1 + w2)
    x1, x2 = to_points_(task_vectors, base, origin)
    if flatten or len(shape) == 0:
        merged = _slerp_along_last_axis(t, x1, x2)
    else:
        axis = 0 if row_wise else -1
        x1, x2 = (x.view(shape).transpose(axis, -1) for x in (x1, x2))
        merged = _slerp_along_last_axis(t, x1, x2).transpose(axis, -1).reshape(-1)
    return from_points_(merged, base, origin)
