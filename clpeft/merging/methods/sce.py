"""SCE: Select the entries where the models disagree most, Calculate weights, Erase minority signs.

Wan et al., "FuseChat: Knowledge Fusion of Chat Models", 2024, https://arxiv.org/abs/2408.07990,
Section 3.3 (mergekit's ``sce``). Per tensor, for task vectors ``tau_k``:

1. Select: keep the ``select_topk`` fraction of entries with the largest variance across the
   models (``floor(select_topk * n)`` of the ``n`` entries whose variance is non-zero; every
   entry tied with the last is kept, ``trim: threshold``, or exactly that many, ``trim: topk``,
   mergekit's ``torch.topk``), zero the others in every task vector;
2. Calculate: ``w_k = mean(tau_k^2) / sum_j mean(tau_j^2)`` of the selected task vectors;
3. Erase: per entry, keep the task vectors whose sign agrees with ``sign(sum_k tau_k)`` (TIES'
   election, ``+`` on a zero sum), ``tau_m = sum_k w_k m_k tau_k / sum_k w_k m_k``.

mergekit falls back to equal weights when ``sum_j mean(tau_j^2) < 1e-6`` and clamps the
denominator of step 3 at 1e-6; both are absolute thresholds on scale-dependent numbers (the
task vectors of LLM fine-tunes often have ``mean(tau^2)`` near 1e-6, where mergekit's weights
become equal), so clpeft uses equal weights only for all-zero task vectors and a zero
denominator only where nothing agrees (a deliberate difference, tests/reference/test_mergekit_methods.py).
"""

from __future__ import annotations

from typing import Annotated

import torch
from pydantic import Field

from clpeft.merging.methods.sparsify import Trim, kth_largest
from clpeft.merging.registry import merge_method

SelectTopK = Annotated[float, Field(ge=0.0, le=1.0, description="fraction of entries kept by their variance across models (Select)")]


def _select_by_variance_(task_vectors: torch.Tensor, fraction: float, trim: str) -> torch.Tensor:
    """Zero, in every task vector, the entries outside the ``fraction`` with the largest variance."""
    variance = task_vectors.var(dim=0, unbiased=False)
    k = int(int(torch.count_nonzero(variance)) * fraction)
    if k == 0:
        return task_vectors.zero_()
    if trim == "topk":
        keep = torch.zeros_like(variance, dtype=torch.bool)
        keep[variance.topk(k).indices] = True
    elif variance.device.type == "cpu":
        keep = variance >= kth_largest(variance, k)
    else:
        keep = variance >= variance.kthvalue(variance.numel() - k + 1).values
    return task_vectors.mul_(keep)


@merge_method("sce", reference_url="https://arxiv.org/abs/2408.07990")
def sce(task_vectors: torch.Tensor, *, select_topk: SelectTopK = 1.0, trim: Trim = "threshold") -> torch.Tensor:
    """SCE: select high-variance entries, weight models by mean squared task vector, erase minority signs (Wan et al., 2024)."""
    if select_topk < 1.0:
        _select_by_variance_(task_vectors, select_topk, trim)
    mass = task_vectors.square().mean(dim=1)
    total = mass.sum()
    weights = mass / total if total > 0 else torch.full_like(mass, 1.0 / mass.numel())
    sign = torch.where(task_vectors.sum(dim=0) >= 0, 1.0, -1.0).to(task_vectors.dtype)
    agreeing = (task_vectors * sign > 0).to(task_vectors.dtype).mul_(weights[:, None])
    denominator = agreeing.sum(dim=0)
    merged = (agreeing * task_vectors).sum(dim=0)
    return merged.div_(torch.where(denominator > 0, denominator, 1.0))
