"""Karcher mean: the Riemannian centre of mass of the models' directions on the unit sphere.

Karcher, "Riemannian center of mass and mollifier smoothing", Comm. Pure Appl. Math. 30(5),
1977, https://doi.org/10.1002/cpa.3160300502; as a merge method, mergekit's ``karcher``, which
cites https://arxiv.org/abs/2603.04972. Per tensor, the flattened weights ``theta_k`` (and the
base's, with ``include_base``: mergekit with ``base_model``, whose base is one more input) are
split into norms ``|theta_k|`` and directions ``u_k``. Directions of norm at most ``tol`` are
left out; the mean direction ``m`` starts at the normalised Euclidean mean and takes up to
``max_iter`` Riemannian gradient steps, ``v = sum_k a_k (Omega_k / sin Omega_k)(u_k - cos Omega_k m)``
(``Omega_k`` the angle between ``m`` and ``u_k``, ``a_k`` equal weights over the directions kept),
``m <- cos|v| m + sin|v| v / |v|``, stopping once ``|v| < tol``. The result is ``m`` scaled by the
mean norm over all models. Equal to mergekit's ``karcher`` (tests/reference/test_mergekit_methods.py).
"""

from __future__ import annotations

from typing import Annotated

import torch
from pydantic import Field

from clpeft.merging.registry import merge_method

MaxIterations = Annotated[int, Field(ge=0, description="most Riemannian gradient steps of the mean direction")]
Tolerance = Annotated[
    float, Field(gt=0.0, description="step norm that stops the iteration; also the smallest norm and angle that count as non-zero")
]


def _karcher_direction(units: torch.Tensor, max_iter: int, tol: float) -> torch.Tensor:
    """The equally weighted Karcher mean of unit rows ``units`` (a new unit vector)."""
    alpha = 1.0 / units.shape[0]
    mean = units.sum(dim=0).mul_(alpha)
    mean_norm = torch.linalg.vector_norm(mean)
    mean = units[0].clone() if mean_norm < tol else mean.div_(mean_norm)
    for _ in range(max_iter):
        cos_omega = (units @ mean).clamp_(-1.0, 1.0)
        omega = torch.arccos(cos_omega)
        step = torch.where(omega < tol, 0.0, alpha * omega / torch.sin(omega))
        tangent = (step @ units).sub_(mean, alpha=float(step @ cos_omega))
        tangent_norm = torch.linalg.vector_norm(tangent)
        if tangent_norm < tol:
            break
        mean = mean.mul_(torch.cos(tangent_norm)).add_(tangent.mul_(torch.sin(tangent_norm) / tangent_norm))
        unit_norm = torch.linalg.vector_norm(mean)
        if unit_norm > tol:
            mean.div_(unit_norm)
    return mean


@merge_method("karcher", reference_url="https://arxiv.org/abs/2603.04972")
def karcher(
    task_vectors: torch.Tensor,
    *,
    max_iter: MaxIterations = 10,
    tol: Tolerance = 1e-5,
    include_base: bool = False,
    base: torch.Tensor,
) -> torch.Tensor:
    """Karcher mean of the models' directions on the sphere, scaled by their mean norm (Karcher, 1977)."""
    points = task_vectors.add_(base)
    if include_base:
        points = torch.cat([base[None], points])
    if points.shape[0] == 1:
        return points[0].sub_(base)
    norms = torch.linalg.vector_norm(points, dim=1)
    kept = norms > tol
    if not kept.any():
        return base.neg()  # every model is (nearly) zero: so is their mean, as in mergekit
    direction = _karcher_direction(points[kept] / norms[kept, None], max_iter, tol)
    return direction.mul_(norms.mean()).sub_(base)
