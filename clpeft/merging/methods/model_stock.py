"""Model Stock: move from the base towards the fine-tunes' average by how much they agree.

Jang, Yun and Han, "Model Stock: All we need is just a few fine-tuned models", ECCV 2024,
https://arxiv.org/abs/2403.19522, Section 3 (Eq. 2): with ``cos Omega`` the mean cosine between
pairs of task vectors of a layer and ``k`` fine-tuned models, the interpolation ratio is
``t = k cos Omega / (1 + (k - 1) cos Omega)`` and the merged layer ``t theta_avg + (1 - t) theta_0``,
i.e. ``theta_0 + t mean_k tau_k``. The angle is measured per tensor (the paper's per layer), or
with ``filter_wise`` per output row (mergekit's option). A cosine whose denominator vanishes
(``|1 + (k - 1) cos Omega| < 1e-6``) keeps the base, and norm products are clamped at 1e-6, as
in mergekit. Equal to mergekit's ``model_stock`` (tests/reference/test_mergekit_methods.py),
except for ``filter_wise`` on tensors of three or more axes (convolutions): clpeft's filter is an
output channel (the tensor's first axis), mergekit's a slice along the last axis.
"""

from __future__ import annotations

import torch

from clpeft.errors import UserError
from clpeft.merging.registry import merge_method


@merge_method("model_stock", reference_url="https://arxiv.org/abs/2403.19522")
def model_stock(task_vectors: torch.Tensor, *, filter_wise: bool = False, shape: tuple[int, ...]) -> torch.Tensor:
    """theta_0 + t mean_k tau_k with t = k cos / (1 + (k - 1) cos) from the task vectors' angles (Jang et al., ECCV 2024)."""
    k = task_vectors.shape[0]
    if k < 2:
        raise UserError(f"model_stock measures the angle between fine-tuned models and needs at least two, got {k}", key="models")
    rows = shape[0] if filter_wise and len(shape) >= 2 else 1
    vectors = task_vectors.view(k, rows, -1)
    norms = torch.linalg.vector_norm(vectors, dim=2)
    first, second = torch.triu_indices(k, k, offset=1)
    dots = (vectors[first] * vectors[second]).sum(dim=2)
    cos_omega = (dots / (norms[first] * norms[second]).clamp(min=1e-6)).clamp(-1.0, 1.0).mean(dim=0)
    denominator = 1 + (k - 1) * cos_omega
    singular = denominator.abs() < 1e-6
    t = torch.where(singular, 0.0, k * cos_omega / torch.where(singular, 1.0, denominator))
    return vectors.mean(dim=0).mul_(t[:, None]).reshape(-1)
