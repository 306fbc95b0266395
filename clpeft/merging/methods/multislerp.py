"""Multi-SLERP: barycentric interpolation of K models on a hypersphere.

Goddard, "Multi-SLERP" (2025), https://goddard.blog/posts/multislerp-wow-what-a-cool-idea (the
reference of mergekit's ``multislerp``), after Buss and Fillmore, "Spherical averages and
applications to spherical splines and interpolation", ACM TOG 2001. Per tensor, with
``x_k`` the flattened vectors (task vectors or weights, :mod:`~clpeft.merging.methods.weight_space`)
and normalised weights ``w_k``:

1. project onto the unit sphere, ``u_k = x_k / (|x_k| + eps)``;
2. the weighted Euclidean mean direction ``m = sum_k w_k u_k / |sum_k w_k u_k|``;
3. the tangent vectors at ``m``, ``v_k = u_k - (u_k . m) m``, averaged: ``v = sum_k w_k v_k``;
4. back to the sphere by the exponential map, ``m cos|v| + v sin|v| / |v|`` (``|v| + eps``);
5. scaled by the weighted mean norm ``sum_k w_k |x_k|``.

One model is returned as it is. Where the weighted mean direction vanishes (antipodal inputs
with balancing weights) two models are interpolated linearly and more are an error, as in
mergekit. Equal to mergekit's ``multislerp`` (tests/reference/test_mergekit_methods.py).
"""

from __future__ import annotations

import torch

from clpeft.errors import UserError
from clpeft.merging.methods.generalized import task_coefficients
from clpeft.merging.methods.linear import ModelWeights
from clpeft.merging.methods.slerp import Epsilon
from clpeft.merging.methods.weight_space import Origin, from_points_, to_points_
from clpeft.merging.registry import merge_method


@merge_method("multislerp", reference_url="https://goddard.blog/posts/multislerp-wow-what-a-cool-idea")
def multislerp(
    task_vectors: torch.Tensor,
    *,
    weights: ModelWeights = None,
    normalize_weights: bool = True,
    eps: Epsilon = 1e-8,
    origin: Origin = "base",
    base: torch.Tensor,
) -> torch.Tensor:
    """Barycentric SLERP of K models on the hypersphere, scaled by their mean norm (Goddard, 2025)."""
    points = to_points_(task_vectors, base, origin)
    if points.shape[0] == 1:
        return from_points_(points[0], base, origin)
    w = task_coefficients(points, 1.0, weights)
    if normalize_weights:
        w = w / w.sum()
    norms = torch.linalg.vector_norm(points, dim=1)
    units = points / (norms[:, None] + eps)
    mean = w @ units
    mean_norm = torch.linalg.vector_norm(mean)
    if mean_norm < eps:
        if points.shape[0] != 2:
            raise UserError(
                "the weighted mean direction of the models is zero (antipodal models with balancing weights); use other weights",
                key="parameters.weights",
            )
        return from_points_(w @ points, base, origin)
    mean /= mean_norm
    tangent = w @ units.sub_(torch.outer(units @ mean, mean))
    tangent_norm = torch.linalg.vector_norm(tangent) + eps
    merged = mean.mul_(torch.cos(tangent_norm)).add_(tangent * (torch.sin(tangent_norm) / tangent_norm))
    return from_points_(merged.mul_(norms @ w), base, origin)
