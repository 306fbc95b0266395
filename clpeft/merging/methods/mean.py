"""Uniform average of the fine-tuned models ("uniform soup").

Wortsman et al., "Model soups: averaging weights of multiple fine-tuned models improves
accuracy without increasing inference time", ICML 2022, https://arxiv.org/abs/2203.05482.
``theta = (1/K) sum_k theta_k = theta_0 + (1/K) sum_k tau_k``: task arithmetic with
``lambda = 1/K``.
"""

from __future__ import annotations

import torch

from clpeft.merging.methods.generalized import combine, task_coefficients
from clpeft.merging.registry import merge_method


@merge_method("mean", reference_url="https://arxiv.org/abs/2203.05482", linear=True)
def mean(task_vectors: torch.Tensor) -> torch.Tensor:
    """Uniform average of the models: tau_m = (1/K) sum_k tau_k (Wortsman et al., ICML 2022)."""
    return combine(task_vectors, task_coefficients(task_vectors, 1.0 / task_vectors.shape[0], None), "sum")
