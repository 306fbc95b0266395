"""Sparsification of task vectors: magnitude trimming (TIES) and random drop-and-rescale (DARE).

Both work in place on a ``(K, N)`` stack of flattened task vectors, one row per task.

Magnitude trimming keeps the ``k = floor(density * N)`` largest-magnitude entries of each row
(TIES-Merging, Yadav et al., NeurIPS 2023, Algorithm 1, step "Trim";
https://arxiv.org/abs/2306.01708). Fine-tuned minus base weights, rounded to fp32, repeat
magnitudes often (~6% of a ViT-B's entries), so the cut-off can fall inside a run of equal
magnitudes and "the top k" needs a convention:

* ``"threshold"`` (default): keep every entry whose magnitude is at least the k-th largest
  magnitude. Ties at the cut-off are all kept, so a row may keep a few more than ``k``
  entries. The result is a function of the values alone, identical on every device.
* ``"topk"``: keep exactly ``k`` entries, the indices returned by :func:`torch.topk`; which of
  several equal magnitudes survive is up to ``topk``'s implementation. This is what
  ``peft.utils.merge_utils.magnitude_based_pruning`` does. Without ties both agree.

Random dropping follows DARE (Yu et al., ICML 2024, "Language Models are Super Mario",
Section 3; https://arxiv.org/abs/2311.03099): each entry is dropped with probability ``p``
and the survivors are rescaled by ``1 / (1 - p)``, so the expected task vector is unchanged.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Literal

import torch

from clpeft.merging import fused_cpu

__all__ = [
    "Trim",
    "bracket_ranks",
    "drop_and_rescale_",
    "kth_largest",
    "kth_largest_magnitude",
    "random_keep_mask",
    "row_thresholds",
    "shrink_lambdas",
    "trim_below_",
    "trim_by_magnitude_",
]

Trim = Literal["threshold", "topk"]

_SAMPLE = 1 << 14  # sample size used to bracket the k-th largest value on the CPU
_BLOCK = 1 << 18  # entries whose magnitudes are formed at once while counting and banding


def kth_largest(values: torch.Tensor, k: int) -> torch.Tensor:
    """The exact k-th largest entry of a 1-D CPU tensor (``1 <= k <= numel``), as a 0-d tensor.

    ``torch.kthvalue`` selects over the whole tensor (~15 ns per entry on one core here). For
    long tensors a systematic sample first brackets the answer between two sample values;
    entries above the bracket are only counted, and the selection runs on the few entries
    inside it (1.3-2x faster than ``kthvalue`` on ViT-B-sized rows). If the bracket misses (an
    unrepresentative sample) the full selection runs instead, so the result is exact either way.
    """
    return _bracketed_kth_largest(values, k, _unchanged)


def kth_largest_magnitude(values: torch.Tensor, k: int) -> torch.Tensor:
    """``kth_largest(values.abs(), k)`` without a whole copy of the magnitudes: a radix selection
    in the compiled CPU kernel for float32 (:func:`clpeft.merging.fused_cpu.kth_largest_magnitude`,
    ~10x faster), else the bracket's counts and band over one block of ``_BLOCK`` magnitudes at a time."""
    if fused_cpu.supports_selection(values):
        return fused_cpu.kth_largest_magnitude(values, k)
    return _bracketed_kth_largest(values, k, torch.abs)


def _unchanged(values: torch.Tensor) -> torch.Tensor:
    return values


def bracket_ranks(k: int, m: int, n: int) -> tuple[int, int]:
    """The 0-based ranks from the largest, in a sample of ``m`` of ``n`` entries, that bracket the k-th
    largest of all: its expected rank in the sample, ``k m / n``, six binomial standard deviations plus
    two either side (Floyd and Rivest, CACM 1975, "Algorithm 489"). ``clpeft_kth_largest_magnitude``
    in ``linear_merge.c`` computes the same in C."""
    expected = k * m / n
    margin = 6.0 * math.sqrt(expected * (1.0 - k / n)) + 2.0
    return int(expected - margin), int(expected + margin)


def _bracketed_kth_largest(values: torch.Tensor, k: int, transform: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """The k-th largest entry of ``transform(values)`` (an entrywise map), formed block by block."""
    n = values.numel()
    if n <= 32 * _SAMPLE:
        return transform(values).kthvalue(n - k + 1).values
    sample = transform(values[:: n // _SAMPLE]).sort(descending=True).values
    m = sample.numel()
    upper_rank, lower_rank = bracket_ranks(k, m, n)
    upper = sample[upper_rank] if upper_rank >= 0 else values.new_tensor(math.inf)
    lower = sample[lower_rank] if lower_rank < m else values.new_tensor(-math.inf)
    above, band = 0, []
    for start in range(0, n, _BLOCK):
        block = transform(values[start : start + _BLOCK])
        above += int(torch.count_nonzero(block > upper))
        band.append(block[(block >= lower).logical_and_(block <= upper)])
    rank = k - above  # rank of the answer inside the bracket
    if rank >= 1:
        inside = torch.cat(band)
        if rank <= inside.numel():
            return inside.kthvalue(inside.numel() - rank + 1).values
    return transform(values).kthvalue(n - k + 1).values


def trim_by_magnitude_(task_vectors: torch.Tensor, density: float, trim: Trim = "threshold") -> torch.Tensor:
    """Zero all but the largest-magnitude ``density`` fraction of each row, in place.

    On the CPU rows are trimmed one at a time through one reused row of magnitudes (the cut is
    :func:`trim_below_`'s); on other devices all rows go at once, without synchronising with
    the host. This is the trim of one tensor on its own (``trim_scope: tensor``, peft's way);
    TIES' official code trims over the whole model (:mod:`~clpeft.merging.methods.model_trim`).

    Args:
        task_vectors: ``(K, N)``; each row is trimmed on its own.
        density: fraction kept, ``k = floor(density * N)`` (``k`` in TIES; peft's rounding).
        trim: tie convention at the cut-off, see the module docstring.

    Returns:
        ``task_vectors``.
    """
    n = task_vectors.shape[1]
    k = int(density * n)
    if k >= n:
        return task_vectors
    if k == 0:
        return task_vectors.zero_()
    if trim == "topk":
        for row in task_vectors:  # row by row, the very call peft makes
            keep = torch.zeros_like(row, dtype=torch.bool)
            keep[row.abs().topk(k).indices] = True
            row.masked_fill_(~keep, 0)
        return task_vectors
    if task_vectors.device.type != "cpu":
        magnitudes = task_vectors.abs()
        return task_vectors.masked_fill_(magnitudes < magnitudes.kthvalue(n - k + 1, dim=1, keepdim=True).values, 0)
    for row, threshold in zip(task_vectors, _each_kth_largest_magnitude(task_vectors, k)):
        _hardshrink_below_(row, threshold)
    return task_vectors


def trim_below_(task_vectors: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """Zero every entry of row ``t`` whose magnitude is below ``thresholds[t]``, in place.

    The thresholds may come in a wider dtype than the rows (a float64 threshold of a model that
    mixes float64 and float32 tensors); each is rounded up to the rows' dtype, which keeps
    exactly the entries at or above the wide value.

    Args:
        task_vectors: ``(K, N)``.
        thresholds: ``(K,)`` magnitudes (``+inf`` zeroes a row, 0 keeps it whole).

    Returns:
        ``task_vectors``.
    """
    thresholds = _rounded_up(thresholds.to(task_vectors.device), task_vectors.dtype)
    if task_vectors.device.type != "cpu":
        return task_vectors.masked_fill_(task_vectors.abs() < thresholds[:, None], 0)
    for row, threshold in zip(task_vectors, thresholds):
        _hardshrink_below_(row, threshold)
    return task_vectors


def row_thresholds(task_vectors: torch.Tensor, density: float, trim: Trim) -> torch.Tensor | None:
    """The ``(K,)`` cut-offs :func:`trim_by_magnitude_` keeps ``|tau| >=`` at (``trim: threshold``), or
    ``None`` where it trims otherwise (``topk``) or not by a cut-off (``k = 0`` or ``k >= N``)."""
    n = task_vectors.shape[1]
    k = int(density * n)
    if trim != "threshold" or not 0 < k < n:
        return None
    return torch.stack(_each_kth_largest_magnitude(task_vectors, k))


def _each_kth_largest_magnitude(task_vectors: torch.Tensor, k: int) -> list[torch.Tensor]:
    """:func:`kth_largest_magnitude` of each row; in the compiled kernel the rows' selections are shared
    between the torch threads, each selection on one thread (1.7x on two threads where OpenMP's idle
    threads do not spin on the second core: docs/merging.md, "Threads")."""
    if fused_cpu.supports_selection(task_vectors):
        return fused_cpu.share([(row.numel(), functools.partial(fused_cpu.kth_largest_magnitude, row, k)) for row in task_vectors])
    return [kth_largest_magnitude(row, k) for row in task_vectors]


def shrink_lambdas(thresholds: torch.Tensor, dtype: torch.dtype) -> list[float]:
    """The ``torch.hardshrink`` ``lambda`` of each row whose shrink is :func:`trim_below_` with ``thresholds``
    on rows of ``dtype``: the float just below each threshold rounded up to ``dtype`` (0 for a 0 threshold)."""
    thresholds = _rounded_up(thresholds.cpu(), dtype)
    return torch.nextafter(thresholds, torch.zeros_like(thresholds)).tolist()


def _hardshrink_below_(row: torch.Tensor, threshold: torch.Tensor) -> None:
    """``row[|row| < threshold] = 0`` as ``hardshrink`` (zero where ``|x| <= lambda``) with ``lambda``
    the float just below the threshold (:func:`shrink_lambdas`, which the compiled election uses too):
    exact, and ~7x faster than a masked fill on the CPU."""
    (shrink,) = shrink_lambdas(threshold.reshape(1), row.dtype)
    torch.hardshrink(row, shrink, out=row)


def _rounded_up(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The smallest ``dtype`` numbers at or above ``values`` (for ``x >= value`` tests on ``dtype`` x)."""
    narrow = values.to(dtype)
    if narrow.dtype == values.dtype:
        return narrow
    below = narrow.to(values.dtype) < values
    return torch.where(below, torch.nextafter(narrow, torch.full_like(narrow, math.inf)), narrow)


def random_keep_mask(task_vectors: torch.Tensor, keep_probability: float, generator: torch.Generator | None) -> torch.Tensor:
    """A 0/1 mask shaped like ``task_vectors``: each entry is 1 with ``keep_probability``."""
    return torch.empty_like(task_vectors).bernoulli_(keep_probability, generator=generator)


def drop_and_rescale_(task_vectors: torch.Tensor, drop_rate: float, rescale: bool, generator: torch.Generator | None) -> torch.Tensor:
    """DARE in place: drop each entry with probability ``p = drop_rate``, rescale by ``1/(1-p)``.

    Args:
        task_vectors: ``(K, N)``.
        drop_rate: ``p`` in DARE, in ``[0, 1)``.
        rescale: divide the survivors by ``1 - p`` (DARE's rescale; without it, plain dropout).
        generator: source of randomness (seeded per tensor by the merge engine).

    Returns:
        ``task_vectors``.
    """
    if drop_rate == 0.0:
        return task_vectors
    task_vectors.mul_(random_keep_mask(task_vectors, 1.0 - drop_rate, generator))
    if rescale:
        task_vectors.div_(1.0 - drop_rate)
    return task_vectors
