"""Task arithmetic: add scaled task vectors to the base.

Ilharco et al., "Editing Models with Task Arithmetic", ICLR 2023,
https://arxiv.org/abs/2212.04089. A task vector is ``tau_k = theta_k - theta_0`` (Section 2);
adding them (Section 3, "Learning via addition") gives ``theta = theta_0 + lambda * sum_k tau_k``,
with ``lambda`` chosen on held-out data.

Default ``scale`` (lambda) 0.3: the value of AdaMerging's task-arithmetic baseline
(``scaling_coef_ = 0.3`` in ``main_task_arithmetic.py``, EnnengYang/AdaMerging), which produced
the task-arithmetic numbers that the AdaMerging and later merging papers compare against on the
eight ViT tasks. The TIES authors search lambda in 0.1-1.0 on validation data
(``task-vector_linear+0.1+1.01+0.1``): ``clpeft merge --search scale=0.1:1.0:0.1 --on CONFIG``.
The result equals ``TaskVector.apply_to`` of the reference (tests/reference/test_merging.py).
"""

from __future__ import annotations

import torch

from clpeft.merging.methods.generalized import Scale, Weights, combine, task_coefficients
from clpeft.merging.registry import merge_method


@merge_method("task_arithmetic", reference_url="https://arxiv.org/abs/2212.04089", linear=True)
def task_arithmetic(task_vectors: torch.Tensor, *, scale: Scale = 0.3, weights: Weights = None) -> torch.Tensor:
    """Task arithmetic: tau_m = lambda * sum_k w_k tau_k (Ilharco et al., ICLR 2023)."""
    return combine(task_vectors, task_coefficients(task_vectors, scale, weights), "sum")
