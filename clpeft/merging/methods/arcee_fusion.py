"""Arcee Fusion: keep only the fine-tuned model's most important changes, by an outlier threshold.

Arcee AI, "Meet MergeKit v0.1: Arcee Fusion, expanded model support, multi-GPU acceleration",
2025, https://www.arcee.ai/blog/meet-mergekit-v0-1-arcee-fusion-expanded-model-support-multi-gpu-acceleration
(mergekit's ``arcee_fusion``, ``mergekit/merge_methods/arcee_fusion.py``; no paper yet). Per
tensor, with ``a`` the base and ``b`` the fine-tuned model, each row (the last dimension; a 1-D
tensor is one row) gets ``KL = sum_j p_j log(p_j / q_j)``, ``p = softmax(b) + 1e-8``,
``q = softmax(a) + 1e-8``; entry ``i`` has importance ``I_i = |b_i - a_i| KL(row of i)``, and
``theta = a + (b - a) [I >= Q2 + 1.5 (Q3 - Q1)]`` with ``Q1, Q2, Q3`` the quartiles of ``I``
over the tensor (the upper Tukey fence: the changes that are outliers in importance).

Quantile ``q`` of ``n`` importances is the ``floor(q (n - 1))``-th smallest (from 0), mergekit's
convention (the lower order statistic, no interpolation). mergekit estimates the quartiles from
a random sample of 1M entries (drawn with replacement) for larger tensors, so its merge of an
LLM's big matrices changes from run to run; clpeft computes them exactly over every entry, so a
merge is deterministic (a deliberate difference; on tensors of at most 1M entries the two agree,
tests/reference/test_mergekit_more.py). ``b`` is formed as ``a + tau`` in the merge's working dtype
(float32 for 16- and 32-bit checkpoints), the KL a block of rows at a time.
"""

from __future__ import annotations

import torch

from clpeft.merging.methods.one_model import single_task_vector
from clpeft.merging.methods.sparsify import kth_largest
from clpeft.merging.registry import merge_method

_SOFTMAX_FLOOR = 1e-8  # mergekit's epsilon added to both distributions
_FENCE = 1.5  # Tukey's: Q2 + 1.5 IQR
_ROW_BLOCK_ENTRIES = 1 << 20  # entries whose softmaxes are formed at once


def row_divergence(base: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """``KL(softmax(b) + 1e-8 || softmax(a) + 1e-8)`` of each row, ``(R, 1)``, from the ``(R, C)``
    base rows ``a`` and task-vector rows ``b - a``."""
    rows, columns = base.shape
    out = base.new_empty(rows, 1)
    step = max(1, _ROW_BLOCK_ENTRIES // max(columns, 1))
    for start in range(0, rows, step):
        block = slice(start, start + step)
        p = torch.softmax(base[block] + tau[block], dim=-1).add_(_SOFTMAX_FLOOR)
        q = torch.softmax(base[block], dim=-1).add_(_SOFTMAX_FLOOR)
        torch.sum(p * torch.div(p, q, out=q).log_(), dim=-1, keepdim=True, out=out[block])
    return out


def order_statistic(values: torch.Tensor, index: int) -> torch.Tensor:
    """The ``index``-th smallest entry (from 0) of a 1-D tensor, exactly."""
    if values.device.type == "cpu":
        return kth_largest(values, values.numel() - index)
    return values.kthvalue(index + 1).values


def fence(importance: torch.Tensor) -> torch.Tensor:
    """``Q2 + 1.5 (Q3 - Q1)``, quartile ``q`` being the ``floor(q (n - 1))``-th smallest entry."""
    last = importance.numel() - 1
    q1, q2, q3 = (order_statistic(importance, i) for i in (last // 4, last // 2, 3 * last // 4))
    return q2 + _FENCE * (q3 - q1)


@merge_method(
    "arcee_fusion", reference_url="https://www.arcee.ai/blog/meet-mergekit-v0-1-arcee-fusion-expanded-model-support-multi-gpu-acceleration"
)
def arcee_fusion(task_vectors: torch.Tensor, *, base: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """Arcee Fusion: keep the changes whose |b - a| KL(softmax(b) || softmax(a)) is above median + 1.5 IQR (Arcee AI, 2025)."""
    tau = single_task_vector(
        task_vectors, "arcee_fusion fuses exactly one fine-tuned model into the base, got {count}; merge them in sequence or use ram"
    )
    if tau.numel() == 0:
        return tau
    columns = shape[-1] if len(shape) else 1
    divergence = row_divergence(base.view(-1, columns), tau.view(-1, columns))
    importance = tau.abs().view(-1, columns).mul_(divergence).view(-1)
    return tau.mul_(importance >= fence(importance))
