"""TIES' trim over the whole model: the exact k-th largest magnitude of each task vector, streamed.

TIES-Merging (Yadav et al., NeurIPS 2023, https://arxiv.org/abs/2306.01708, Algorithm 1, "Trim")
keeps the top-k% entries of each task vector, and its official code flattens every parameter
of a model into one vector per task before selecting (``state_dict_to_vector`` and
``topk_values_mask`` in ``ties-merging/src/utils/merge_utils.py``, the same in AdaMerging's
``ties_merging_utils.py``). The cut-off is therefore one magnitude per task for the whole model,
not one per tensor: a tensor whose fine-tuning changed little loses most of its entries.

Holding K flattened models is what the merge engine avoids, so the cut-off is found by radix
selection over the IEEE-754 bit patterns of the magnitudes, which order like the magnitudes
themselves. Each sweep over the model's task vectors histograms one 16-bit digit of every
entry whose higher bits equal the digits chosen so far (``2^16 + 2`` counters per task); the
digit holding the k-th largest entry is then read off the histogram. Two sweeps settle a
float32 model, four a float64 one; memory is the counters, whatever the model's size, and the
result is exact. On the CPU a float32 sweep counts in the compiled library
(:func:`~clpeft.merging.fused_cpu.count_magnitude_digits`: one read-only pass, ~1 ns per entry),
straight from the fine-tuned and base tensors where the engine offers them
(:meth:`KthLargestMagnitude.observe_differences`: the task vectors are never written). There a
sample sweep and a band sweep usually settle it first, with the same result
(:mod:`~clpeft.merging.methods.model_bracket`).
"""

from __future__ import annotations

import math

import torch

from clpeft.merging import fused_cpu
from clpeft.merging.methods.model_bracket import ModelBracket
from clpeft.merging.registry import ModelShape

__all__ = ["KthLargestMagnitude"]

_DIGIT_BITS = 16
_DIGITS = 1 << _DIGIT_BITS
_BINS = _DIGITS + 2  # per task: [below the prefix, digit 0 .. digit 2^16 - 1, above the prefix]


class KthLargestMagnitude:
    """The exact k-th largest ``|tau_t|`` of each task vector over every tensor of a model.

    A :class:`~clpeft.merging.registry.ModelStatistic`: feed it every merged tensor's ``(K, n)``
    task vectors once per sweep while :meth:`wants_sweep`; :meth:`result` is then a ``(K,)``
    tensor of thresholds in ``shape.dtype``. Keeping ``|tau| >= threshold`` keeps the ``k``
    largest entries of each task vector, and every entry tied with the k-th.

    Args:
        k: rank of the threshold, counted from the largest; ``k = 0`` gives ``+inf`` (keep
            nothing), ``k >= N`` gives 0 (keep everything), neither needs a sweep.
        shape: the model's size, number of tasks, working dtype and device.
    """

    def __init__(self, k: int, shape: ModelShape):
        self.shape = shape
        self._float = shape.dtype
        self._int = torch.int64 if shape.dtype == torch.float64 else torch.int32
        bits = torch.finfo(shape.dtype).bits
        self._shifts = list(range(bits - _DIGIT_BITS, -1, -_DIGIT_BITS))  # float32: 16, 0
        self._constant = None if 0 < k < shape.numel else (math.inf if k <= 0 else 0.0)
        self._level = 0 if self._constant is None else len(self._shifts)
        device, tasks = shape.device, shape.num_tasks
        self._rank = torch.full((tasks,), max(k, 1), dtype=torch.int64, device=device)
        self._prefix = torch.zeros(tasks, dtype=torch.int64, device=device)
        self._offsets = (torch.arange(tasks, device=device) * _BINS + 1).to(self._int)[:, None]
        self._counts = torch.zeros(tasks * _BINS, dtype=torch.int64, device=device)
        # float32 on the CPU: a sample sweep and a band sweep settle it where the bracket holds
        self._bracket = ModelBracket(k, shape) if self._constant is None and ModelBracket.applies(k, shape) else None
        self._wasted = False  # a sweep the bracket gave up midway: nothing of it counts

    def wants_sweep(self) -> bool:
        return self._bracket is not None or self._wasted or self._level < len(self._shifts)

    def observe(self, task_vectors: torch.Tensor) -> None:
        """Count this tensor's entries by their current digit; ``task_vectors`` is overwritten."""
        if self._bracket is not None and not self._bracket.observe(task_vectors):
            self._bracket, self._wasted = None, True  # rows it cannot read: radix sweeps from the next sweep on
        if self._bracket is not None or self._wasted:
            return
        values = task_vectors if task_vectors.dtype == self._float else task_vectors.to(self._float)
        if fused_cpu.supports_selection(values):  # float32 on the CPU: the compiled counting loop, read-only
            fused_cpu.count_magnitude_digits(values, self._shifts[self._level], self._prefix.tolist(), self._digit_counts())
            return
        bits = values.abs_().view(self._int)  # non-negative floats order like their bit patterns
        bits.bitwise_right_shift_(self._shifts[self._level])
        # the digit where the higher bits equal the prefix chosen so far; -1 below it, 2^16 above
        bits.sub_((self._prefix << _DIGIT_BITS).to(self._int)[:, None]).clamp_(-1, _DIGITS).add_(self._offsets)
        self._counts += torch.bincount(bits.reshape(-1), minlength=self._counts.numel())

    def observe_differences(self, sources: list[torch.Tensor], base: torch.Tensor) -> bool:
        """:meth:`observe` of the task vectors ``sources[t] - base`` without forming them, where the compiled
        loop applies (float32 counts on the CPU); ``False``, nothing counted, elsewhere."""
        if self._float != torch.float32 or not fused_cpu.supports_difference_counts(sources, base):
            return False
        if self._bracket is not None:
            self._bracket.observe_differences(sources, base)
        elif not self._wasted:
            fused_cpu.count_difference_digits(sources, base, self._shifts[self._level], self._prefix.tolist(), self._digit_counts())
        return True

    def _digit_counts(self) -> torch.Tensor:
        """``(K, 2^16)`` view of each task's counters for digits 0 .. 2^16 - 1 (the compiled loops' layout)."""
        return self._counts.view(-1, _BINS)[:, 1 : _DIGITS + 1]

    def end_sweep(self) -> None:
        """Choose each task's digit: the one holding the remaining rank, counted from the top (or end
        the bracket's sample sweep, or take its answer after the band sweep)."""
        if self._wasted:  # the bracket gave up during this sweep, which counted nothing
            self._wasted = False
            return
        if self._bracket is not None:
            if self._bracket.sampling:
                self._bracket.end_sample()
                return
            thresholds = self._bracket.resolve()
            self._bracket = None
            if thresholds is not None:  # exact: no radix sweep needed
                self._prefix = thresholds.view(torch.int32).to(torch.int64)
                self._level = len(self._shifts)
            return
        counts = self._digit_counts().flip(1)  # digit 2^16 - 1 first
        from_top = counts.cumsum(1)
        index = torch.searchsorted(from_top, self._rank[:, None])  # first digit reaching the rank
        self._rank -= (from_top.gather(1, index) - counts.gather(1, index)).squeeze(1)
        self._prefix = (self._prefix << _DIGIT_BITS) | (_DIGITS - 1 - index.squeeze(1))
        self._counts.zero_()
        self._level += 1

    def result(self) -> torch.Tensor:
        """``(K,)`` thresholds in ``shape.dtype``."""
        if self._constant is not None:
            return torch.full((self.shape.num_tasks,), self._constant, dtype=self._float, device=self.shape.device)
        return self._prefix.to(self._int).view(self._float)
