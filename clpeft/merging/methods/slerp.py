"""SLERP: spherical linear interpolation between the base and one fine-tuned model.

Shoemake, "Animating rotation with quaternion curves", SIGGRAPH 1985,
https://doi.org/10.1145/325165.325242 (mergekit's ``slerp`` cites
https://en.wikipedia.org/wiki/Slerp). Per tensor, with ``v_0 = theta_0`` and ``v_1 = theta_1``
flattened and ``Omega`` the angle between them (``cos Omega = v_0 . v_1 / (|v_0| |v_1|)``),
``theta = sin((1 - t) Omega) / sin(Omega) v_0 + sin(t Omega) / sin(Omega) v_1``: the weights
move along the great circle between the two models, scaled as the endpoints are (the
coefficients multiply the unnormalised tensors, as in mergekit). Nearly parallel tensors
(``|cos Omega| > dot_threshold``) fall back to linear interpolation; a norm at most ``eps``
counts as 1, as in mergekit.

The interpolation is between weights, not task vectors: the method takes the base tensor from
the engine. Equal to mergekit's ``slerp`` (tests/reference/test_mergekit_methods.py).
"""

from __future__ import annotations

import math
from typing import Annotated

import torch
from pydantic import Field

from clpeft.merging.methods.one_model import single_task_vector
from clpeft.merging.registry import merge_method

InterpolationFactor = Annotated[float, Field(description="t: position between the base (0) and the fine-tuned model (1)")]
DotThreshold = Annotated[
    float, Field(ge=0.0, le=1.0, description="|cos Omega| above which the tensors count as parallel and are interpolated linearly")
]
Epsilon = Annotated[float, Field(ge=0.0, description="norms at most this count as 1 (mergekit's eps)")]


def spherical_interpolation(t: float, v0: torch.Tensor, v1: torch.Tensor, dot_threshold: float, eps: float) -> torch.Tensor:
    """``sin((1-t) Omega)/sin Omega v0 + sin(t Omega)/sin Omega v1`` of two flat tensors (a new tensor)."""
    norm0, norm1 = (torch.linalg.vector_norm(v) for v in (v0, v1))
    norm0, norm1 = (n if n > eps else torch.ones_like(n) for n in (norm0, norm1))
    cos_omega = float((torch.dot(v0, v1) / (norm0 * norm1)).clamp(-1.0, 1.0))
    if abs(cos_omega) > dot_threshold:
        c0, c1 = 1.0 - t, t
    else:
        omega = math.acos(cos_omega)
        c0, c1 = math.sin((1.0 - t) * omega) / math.sin(omega), math.sin(t * omega) / math.sin(omega)
    return torch.add(v0 * c0, v1, alpha=c1)


@merge_method("slerp", reference_url="https://doi.org/10.1145/325165.325242")
def slerp(
    task_vectors: torch.Tensor,
    *,
    t: InterpolationFactor = 0.5,
    dot_threshold: DotThreshold = 0.9995,
    eps: Epsilon = 1e-8,
    base: torch.Tensor,
) -> torch.Tensor:
    """SLERP between the base and one fine-tuned model by t (Shoemake, SIGGRAPH 1985)."""
    tau = single_task_vector(
        task_vectors,
        "slerp interpolates between the base and exactly one fine-tuned model, got {count}; use multislerp or karcher for more",
    )
    finetuned = tau.add_(base)
    return spherical_interpolation(t, base, finetuned, dot_threshold, eps).sub_(base)
