"""Task arithmetic: add scaled task vectors to the base.

Ilharco et al., "Editing Models with Task Arithmetic", ICLR 2023,
https://arxiv.org/abs/2212.04089. A task vector is ``tau_k = theta_k - theta_0`` (Section 2);
adding them (Section 3, "Learning via addition") gives ``theta = theta_0 + lambda * sum_k tau_k``,
with ``lambda`` chosen on held-out data (the paper reports 0.3-0.4 for eight ViT tasks).
"""

from __future__ import annotations

import torch

from clpeft.merging.methods.generalized import Scale, Weights, combine, task_coefficients
from clpeft.merging.registry import merge_method


@merge_method("task_arithmetic", reference_url="https://arxiv.org/abs/2212.04089", linear=True)
def task_arithmetic(task_vectors: torch.Tensor, *, scale: Scale = 1.0, weights: Weights = None) -> torch.Tensor:
    """Task arithmetic: tau_m = lambda * sum_k w_k tau_k (Ilharco et al., ICLR 2023)."""
    return combine(task_vectors, task_coefficients(task_vectors, scale, weights), "sum")
