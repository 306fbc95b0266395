"""The task-arithmetic family as one core with two switches.

Task arithmetic, TIES, DARE and the plain mean differ only in how each task vector is
sparsified (not at all, by magnitude, at random) and how the K task vectors are combined
(a weighted sum, or TIES' sign election and disjoint mean); mergekit makes the same
observation (``GeneralizedTaskArithmeticMerge``, ``mergekit/sparsify.py``). The registered
methods are configurations of :func:`combine` after a sparsification from
:mod:`~clpeft.merging.methods.sparsify`.

Notation (per tensor): ``tau_k = theta_k - theta_0`` is task ``k``'s task vector, ``c_k`` its
coefficient (``scale * weights[k]``). The merged tensor is ``theta_0 + tau_m``.
"""

from __future__ import annotations

from typing import Annotated, Literal

import torch
from pydantic import Field

from clpeft.errors import UserError
from clpeft.merging import fused_cpu

__all__ = ["Consensus", "Disjoint", "Scale", "Weights", "combine", "task_coefficients"]

Consensus = Literal["sum", "ties"]
ELECTION_COLUMNS = 1 << 18  # columns elected at once on the CPU (the temporaries' size)
Disjoint = Annotated[
    Literal["mean", "sum"],
    Field(description="TIES' disjoint merge of the entries that agree with the elected sign: mean (the paper) or sum"),
]
Scale = Annotated[float, Field(description="lambda: scaling of the merged task vector")]
Weights = Annotated[
    list[float] | None,
    Field(description="per-model coefficients multiplying lambda, in the order of the models (default: all 1)"),
]


def task_coefficients(task_vectors: torch.Tensor, scale: float, weights: list[float] | None) -> torch.Tensor:
    """``c_k = scale * weights[k]`` as a vector on ``task_vectors``' device and dtype."""
    num_tasks = task_vectors.shape[0]
    if weights is None:
        weights = [1.0] * num_tasks
    if len(weights) != num_tasks:
        raise UserError(f"has {len(weights)} entries for {num_tasks} models", key="parameters.weights")
    return torch.tensor(weights, dtype=task_vectors.dtype).mul_(scale).to(task_vectors.device, non_blocking=True)


def combine(task_vectors: torch.Tensor, coefficients: torch.Tensor, consensus: Consensus, disjoint: Disjoint = "mean") -> torch.Tensor:
    """Combine ``(K, N)`` task vectors into one ``(N,)`` merged task vector.

    ``"sum"`` is task arithmetic (Ilharco et al., ICLR 2023, Section 2;
    https://arxiv.org/abs/2212.04089): ``tau_m = sum_k c_k tau_k``.

    ``"ties"`` is TIES-Merging's "Elect" and "Disjoint Merge" (Yadav et al., NeurIPS 2023,
    Algorithm 1; https://arxiv.org/abs/2306.01708): the elected sign of each entry is the
    sign of the total mass ``sum_k tau_k`` (coefficients not applied, as in peft and the
    official code). A zero total elects ``+`` (peft's convention). The official code
    (``resolve_zero_signs``) elects the sign that most entries of the whole flattened model
    elected; that needs one more pass over the model and changes a result only where non-zero
    entries cancel exactly (``+a`` and ``-a``), so clpeft keeps ``+`` (a deliberate difference,
    tests/reference/test_merging.py). Only entries that are non-zero and agree with the elected sign
    contribute: ``tau_m = sum_{k in A} c_k tau_k / max(|A|, 1)`` (``disjoint="mean"``, the
    paper's), or without the division (``disjoint="sum"``: ``merge_func="dis-sum"`` of the
    official code, which AdaMerging's TIES baseline ``main_ties_merging.py`` runs).

    The TIES path overwrites ``task_vectors``. It flips every entry to the elected sign and
    clamps the disagreeing ones to zero; a product with ``+-1`` is exact, so this equals the
    masked formula bit for bit, without a K x N float temporary (only a byte mask to count |A|).
    On the CPU float32 rows go through the compiled kernel
    (:func:`~clpeft.merging.fused_cpu.ties_elect`: the same operations in one pass, no
    temporaries), which writes the merged vector into ``task_vectors[0]``; otherwise the election
    runs over blocks of columns (every step is entrywise), so its temporaries stay the size of a
    block, not of the tensor, and a tensor longer than one block also gets its merged vector back
    in ``task_vectors[0]``.
    """
    if consensus == "sum":
        return coefficients @ task_vectors
    if fused_cpu.supports_election(task_vectors):
        return fused_cpu.ties_elect(task_vectors, coefficients.tolist(), disjoint == "mean")
    n = task_vectors.shape[1]
    if task_vectors.device.type != "cpu" or n <= ELECTION_COLUMNS:
        return _elect(task_vectors, coefficients, disjoint)
    merged = task_vectors[0]
    for start in range(0, n, ELECTION_COLUMNS):
        block = slice(start, start + ELECTION_COLUMNS)
        merged[block] = _elect(task_vectors[:, block], coefficients, disjoint)
    return merged


def _elect(task_vectors: torch.Tensor, coefficients: torch.Tensor, disjoint: Disjoint) -> torch.Tensor:
    """TIES' election and disjoint merge of ``(K, n)`` task vectors (:func:`combine`), in place.

    Sums run over the rows in order (``tau_1 + tau_2 + ...``, each product and sum rounded on its
    own), as the compiled kernel does (:func:`~clpeft.merging.fused_cpu.ties_elect`); a matrix
    product would leave the order and fused multiply-adds to the BLAS."""
    total = task_vectors[0].clone()
    for row in task_vectors[1:]:
        total += row
    sign = torch.where(total >= 0, 1.0, -1.0).to(task_vectors.dtype)
    agreeing = task_vectors.mul_(sign).clamp_(min=0)
    if disjoint == "mean":  # |A| per entry; summing bytes is ~7x faster than count_nonzero(dim=0) on the CPU
        count_dtype = torch.uint8 if task_vectors.shape[0] < 256 else torch.int32
        count = (agreeing > 0).view(torch.uint8).sum(dim=0, dtype=count_dtype).clamp_(min=1)
    agreeing.mul_(coefficients[:, None])
    merged = total.copy_(agreeing[0])
    for row in agreeing[1:]:
        merged += row
    merged.mul_(sign)
    return merged.div_(count) if disjoint == "mean" else merged
