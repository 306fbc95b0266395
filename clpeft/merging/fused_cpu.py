"""Merges on the CPU in compiled loops: linear merges in one pass, TIES' trim and election, half-precision task vectors.

Task arithmetic and the mean give ``theta_0 + sum_k c_k (theta_k - theta_0)`` (Ilharco et al.,
ICLR 2023, Section 2). With ATen ops each cached block takes about ten passes (conversion,
subtraction, norms, scaling, the sums: :func:`~clpeft.merging.blocks.combine_linear`); the loop
in ``linear_merge.c`` reads each input entry once, converts bf16 / fp16 in registers and
accumulates the report's statistics on the way. Its merged tensors equal the ATen path's bit for
bit (same float32 operations in the same order, no fused multiply-adds); only the statistics'
last bits differ. Side by side (``benchmarks/merge_cpu_kernel.py``, benchmarks/RESULTS.md) its
arithmetic is 3-6x faster than the ATen blocks. The same library serves the methods that need
whole task vectors, each loop with the ATen path's bits or exact counts:

* :func:`subtract`: a model's task vector in float32 (bf16 / fp16 converted on the way) and its sum of
  squares, in one pass;
* :func:`finish`: the merged tensor ``theta_0 + delta`` rounded to its dtype and the report's sums, in
  one pass (every method that forms a whole delta);
* :func:`kth_largest_magnitude`: TIES' per-tensor trim threshold by a radix selection, exactly
  ``abs().kthvalue``'s value; :func:`count_magnitude_digits`: one sweep of the model-scope trim's
  radix selection (:mod:`~clpeft.merging.methods.model_trim`), and :func:`count_difference_digits`
  the same sweep straight from the inputs, the task vectors never written;
* :func:`ties_elect`: TIES' sign election and disjoint merge, the model-scope trim fused in;
* :func:`sign_conflict`: the report's sampled sign conflict of a linear merge, counted in one loop
  (:func:`linear_merge` counts it as it merges).

The file is compiled once per machine with the system C compiler (``$CC``, else ``cc``; GCC or
Clang) into ``<cache root>/kernels`` (:func:`~clpeft.paths.kernels_cache_dir`), named by a hash
of the source, the compiler and the CPU, and loaded with :mod:`ctypes` (calls release the GIL;
large tensors are split over ``torch.get_num_threads()`` threads; the engine's linear merges of a
batch are cut into one even span per thread, :func:`linear_merges`, and TIES' selections hand
whole rows to the threads, :func:`share`). Without a compiler, or with
``CLPEFT_CPU_KERNEL=0``, everything keeps the ATen path; ``merge(..., fused=False)`` keeps linear
merges on it. A
cached library that another user could have written (not owned by this user, or writable by
group or others, or in such a folder) is never loaded.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import math
import os
import platform
import shlex
import shutil
import struct
import subprocess
import sysconfig
import tempfile
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, wait
from importlib import resources
from pathlib import Path
from typing import TypeVar

import torch

from clpeft.merging.report import SAMPLE_RUN, sample_runs
from clpeft.paths import kernels_cache_dir

__all__ = [
    "available",
    "band_magnitudes",
    "count_difference_digits",
    "count_magnitude_digits",
    "finish",
    "kth_largest_magnitude",
    "linear_merge",
    "linear_merges",
    "share",
    "sign_conflict",
    "subtract",
    "supports",
    "supports_difference_counts",
    "supports_election",
    "supports_finish",
    "supports_selection",
    "supports_subtraction",
    "ties_elect",
]

_log = logging.getLogger(__name__)
T = TypeVar("T")

_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}  # linear_merge.c's DTYPE_*
_MODE_FLAGS = ["-O3", "-ffp-contract=off", "-fPIC", "-shared"]  # -ffp-contract=off: bits equal ATen's
_ARCH_FLAGS = (["-march=native"], ["-mcpu=native"], [])  # the first the compiler accepts
_MIN_ENTRIES_PER_THREAD = 1 << 20  # smaller tensors merge on the calling thread
_MIN_SHARED_ENTRIES = 1 << 16  # share() runs smaller tasks here: their Python costs what their loop does
_ALIGN = 16  # thread ranges start on a multiple of the kernel's 16-entry step
_SELECTION_COUNTS = (1 << 15) + (1 << 16)  # the radix selection's counts: high 15 bits, then low 16
_BAND_FRACTION = 16  # the bracketed selection's band may hold 1/16 of a tensor (at most ~5% expected; pages touched as used)
_selection_scratch = threading.local()
_merge_rows = threading.local()
_whole_tensors = threading.local()  # set on the threads of share(): calls there do not split their tensor
_FLOAT32 = struct.Struct("f")


def supports(base: torch.Tensor, sources: Sequence[torch.Tensor], out: torch.Tensor) -> bool:
    """Whether :func:`linear_merge` applies: CPU tensors of one dtype the kernel has, flat and
    contiguous, aligned to their element size, and a compiled kernel."""
    dtype, n = base.dtype, base.numel()
    if n == 0 or not sources or not _compiled(dtype):
        return False
    return all(t.dtype == dtype and _readable(t) and t.numel() >= n for t in (base, out, *sources))


def _readable(t: torch.Tensor) -> bool:
    """Whether the compiled loops can take ``t`` as a flat array: on the CPU, contiguous, aligned to its element size."""
    return t.is_cpu and t.is_contiguous() and t.data_ptr() % t.element_size() == 0


def _compiled(dtype: torch.dtype) -> bool:
    """Whether the kernel is :func:`available` and has ``dtype``."""
    return dtype in _DTYPE_CODES and available() and _compiled_dtype(_DTYPE_CODES[dtype])


@functools.cache
def _compiled_dtype(code: int) -> bool:
    return bool(_library().clpeft_supports_dtype(code))


def available() -> bool:
    """Whether the kernel is compiled (or compiles now) and not switched off by ``CLPEFT_CPU_KERNEL=0``."""
    return os.environ.get("CLPEFT_CPU_KERNEL", "1") != "0" and _library() is not None


def linear_merge(
    base: torch.Tensor, sources: Sequence[torch.Tensor], coefficients: Sequence[float], out: torch.Tensor
) -> tuple[list[float], float]:
    """Write ``base + sum_k coefficients[k] (sources[k] - base)`` into ``out`` (float32 arithmetic).

    Args:
        base: the flat base tensor ``theta_0`` (float32, bfloat16 or float16).
        sources: the K flat fine-tuned tensors ``theta_k``, ``base``'s dtype and at least its length.
        coefficients: the K ``c_k`` (rounded to float32).
        out: flat output, ``base``'s dtype and length.

    Returns:
        ``[sum theta_0^2, sum tau_m^2, count(tau_m != 0), sum tau_1^2, ..., sum tau_K^2]`` in Python
        floats (:func:`~clpeft.merging.report.pack_host_sums`' input, the values of
        :func:`~clpeft.merging.blocks.combine_linear`'s sums), and the report's sign conflict, the value
        of :func:`sign_conflict` counted as each chunk is merged (its sample read again from cache).
        Python numbers, not tensors: a small tensor's merge costs about as much as a few ATen calls.
    """
    return linear_merges([(base, sources, coefficients, out)])[0]


def linear_merges(
    merges: Sequence[tuple[torch.Tensor, Sequence[torch.Tensor], Sequence[float], torch.Tensor]],
) -> list[tuple[list[float], float]]:
    """:func:`linear_merge` of each ``(base, sources, coefficients, out)``, the torch threads sharing the work evenly.

    The tensors' entries, end to end, are cut into one span per thread (:func:`_spans`): a thread
    merges the tensors inside its span whole and those at its ends in part, so every thread has the
    same number of entries however unequal the tensors (handed out whole, three equal tensors left
    one of two threads twice the other's work). One hand-off per thread for the whole batch.
    """
    calls = [_LinearCall(*merge) for merge in merges]
    spans = _spans([call.n for call in calls], _threads_for(sum(call.n for call in calls)))

    def run(span: list[tuple[int, int, int]]) -> None:
        for index, start, stop in span:
            calls[index].run(start, stop)

    _run_all(run, spans)
    return [call.result() for call in calls]


class _LinearCall:
    """One linear merge's arguments to ``clpeft_linear_merge``, and the sums and sign conflicts of the parts merged."""

    def __init__(self, base: torch.Tensor, sources: Sequence[torch.Tensor], coefficients: Sequence[float], out: torch.Tensor):
        self.n, self.k, self.size = base.numel(), len(sources), base.element_size()
        self.code = _DTYPE_CODES[base.dtype]
        self.weights = (ctypes.c_float * self.k)(*coefficients)
        self.base, self.out, self.sources = base.data_ptr(), out.data_ptr(), [s.data_ptr() for s in sources]
        self.count, self.step = sample_runs(self.n, self.k) or (0, 1)
        self.parts: list[tuple[ctypes.Array, int]] = []  # appended from several threads (atomic under the GIL)

    def run(self, start: int, stop: int) -> None:
        """Merge entries ``[start, stop)``."""
        shift = start * self.size
        sums, conflicts = (ctypes.c_double * (3 + self.k))(), ctypes.c_int64()
        status = _library().clpeft_linear_merge(
            self.code,
            stop - start,
            self.k,
            self.base + shift,
            (ctypes.c_void_p * self.k)(*[source + shift for source in self.sources]),
            self.weights,
            self.out + shift,
            sums,
            start,
            SAMPLE_RUN,
            self.count,
            self.step,
            ctypes.byref(conflicts),
            _merge_scratch(),
        )
        if status != 0:  # supports() was not asked: a bug in the caller, not in the input
            raise RuntimeError(f"the CPU merge kernel refused dtype code {self.code} with {self.k} models")
        self.parts.append((sums, conflicts.value))

    def result(self) -> tuple[list[float], float]:
        """The merge's sums (added over its parts in float64, exactly rounded) and sign conflict."""
        sums = [math.fsum(part[j] for part, _ in self.parts) for j in range(3 + self.k)] if len(self.parts) > 1 else self.parts[0][0][:]
        return sums, _conflict_share(sum(conflicts for _, conflicts in self.parts), self.count, self.n)


def _merge_scratch() -> int:
    """The address of this thread's rows for :func:`linear_merge` (a chunk's delta and base: 1.5 MiB,
    allocated once per thread and freed with it; pages are touched only as a call uses them)."""
    scratch = getattr(_merge_rows, "scratch", None)
    if scratch is None:
        scratch = _merge_rows.scratch = torch.empty(_library().clpeft_linear_merge_scratch() + 8)  # + 8: room to align
    return -(-scratch.data_ptr() // 32) * 32


def sign_conflict(base: torch.Tensor, sources: Sequence[torch.Tensor]) -> torch.Tensor:
    """The report's sign conflict of the task vectors ``sources[k] - base`` over
    :func:`~clpeft.merging.report.sample_entries`' sample, counted in one compiled loop: the value of
    :func:`~clpeft.merging.report.sign_conflict` on the sampled task vectors (float32, 0-d) without its
    dozen ATen calls, most of a small tensor's merge. Takes what :func:`supports` takes."""
    n, k = base.numel(), len(sources)
    count, step = sample_runs(n, k) or (0, 1)
    pointers = (ctypes.c_void_p * k)(*[s.data_ptr() for s in sources])
    conflicts = _library().clpeft_sign_conflicts(_DTYPE_CODES[base.dtype], n, k, base.data_ptr(), pointers, SAMPLE_RUN, count, step)
    if conflicts < 0:  # supports() was not asked: a bug in the caller, not in the input
        raise RuntimeError(f"the CPU merge kernel has no dtype {base.dtype}")
    return torch.tensor(_conflict_share(conflicts, count, n), dtype=torch.float32)


def _conflict_share(conflicts: int, count: int, n: int) -> float:
    """The sign conflict from the conflicts counted in ``sample_runs``' sample (``count`` runs, or all ``n``),
    rounded to float32 as ATen's statistic is."""
    return _FLOAT32.unpack(_FLOAT32.pack(conflicts / (count * SAMPLE_RUN if count else n)))[0]


def supports_subtraction(source: torch.Tensor, base: torch.Tensor, out: torch.Tensor) -> bool:
    """Whether :func:`subtract` applies: a flat ``source`` of the kernel's dtypes (at least ``base``'s length),
    float32 ``base`` and ``out`` of one length, all contiguous on the CPU, and a compiled kernel."""
    return (
        source.dtype in _DTYPE_CODES
        and base.dtype == out.dtype == torch.float32
        and all(_readable(t) and t.dim() == 1 for t in (source, base, out))
        and source.numel() >= base.numel() == out.numel()
        and _compiled(source.dtype)
    )


def subtract(source: torch.Tensor, base: torch.Tensor, out: torch.Tensor) -> float:
    """``out = source.float() - base`` in one pass (the conversion exact, one rounding: ATen's bits);
    the tensor is split over the torch threads.

    Returns:
        ``sum(out ** 2)`` taken on the way (float32 within 16,384 entries, float64 across them),
        the report's task-vector norm squared.
    """
    n, code, size = out.numel(), _DTYPE_CODES[source.dtype], source.element_size()
    ranges = _column_ranges(n, n)
    squares = torch.zeros(len(ranges), dtype=torch.float64)

    def run(part: int) -> None:
        start, stop = ranges[part]
        _library().clpeft_subtract(
            code,
            stop - start,
            source.data_ptr() + start * size,
            base.data_ptr() + start * 4,
            out.data_ptr() + start * 4,
            squares[part].data_ptr(),
        )

    _run_all(run, range(len(ranges)))
    return float(squares.sum())


def supports_finish(base: torch.Tensor, delta: torch.Tensor, out: torch.Tensor) -> bool:
    """Whether :func:`finish` applies: flat contiguous float32 ``base`` and ``delta`` and an ``out`` of the
    kernel's dtypes, one length, on the CPU, and a compiled kernel."""
    return (
        base.dtype == delta.dtype == torch.float32
        and out.dtype in _DTYPE_CODES
        and all(_readable(t) and t.dim() == 1 for t in (base, delta, out))
        and base.numel() == delta.numel() == out.numel()
        and _compiled(out.dtype)
    )


def finish(base: torch.Tensor, delta: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``out = (base + delta).to(out.dtype)`` in one pass, ATen's bits (one float32 add, rounded to
    nearest even), split over the torch threads: the last step of a merge that forms a whole delta.

    Returns:
        float64 ``[sum theta_0^2, sum delta^2, count(delta != 0)]`` taken on the way
        (:func:`~clpeft.merging.report.pack_sums`' head; float32 within 16,384 entries).
    """
    n, code, size = out.numel(), _DTYPE_CODES[out.dtype], out.element_size()
    ranges = _column_ranges(n, n)
    sums = torch.zeros(len(ranges), 3, dtype=torch.float64)

    def run(part: int) -> None:
        start, stop = ranges[part]
        _library().clpeft_finish(
            code,
            stop - start,
            base.data_ptr() + start * 4,
            delta.data_ptr() + start * 4,
            out.data_ptr() + start * size,
            sums[part].data_ptr(),
        )

    _run_all(run, range(len(ranges)))
    return sums.sum(dim=0)


def supports_selection(values: torch.Tensor) -> bool:
    """Whether :func:`kth_largest_magnitude` applies: a contiguous float32 CPU tensor and a compiled kernel."""
    return values.dtype == torch.float32 and values.device.type == "cpu" and values.is_contiguous() and available()


def kth_largest_magnitude(values: torch.Tensor, k: int) -> torch.Tensor:
    """The exact k-th largest ``|values|`` (``1 <= k <= numel``, finite values), as a 0-d tensor
    (``linear_merge.c``): a large tensor bracketed from a sample in one read-only pass, then a radix
    selection over the magnitudes' bits inside the bracket (or, if the bracket missed, over all)."""
    n = values.numel()
    if not 1 <= k <= n:
        raise ValueError(f"k must lie in [1, {n}], got {k}")
    counts = getattr(_selection_scratch, "counts", None)
    if counts is None:  # scratch per thread, reused by its calls and freed with the thread
        counts = _selection_scratch.counts = torch.empty(_SELECTION_COUNTS, dtype=torch.int64)
    band = getattr(_selection_scratch, "band", torch.empty(0))
    if band.numel() < n // _BAND_FRACTION:
        band = _selection_scratch.band = torch.empty(max(n // _BAND_FRACTION, 2 * band.numel()))
    threshold = _library().clpeft_kth_largest_magnitude(values.data_ptr(), n, k, counts.data_ptr(), band.data_ptr(), band.numel())
    return values.new_tensor(threshold)


def supports_election(task_vectors: torch.Tensor) -> bool:
    """Whether :func:`ties_elect` applies: contiguous float32 ``(K, n)`` rows on the CPU and a compiled kernel."""
    return task_vectors.dim() == 2 and task_vectors.shape[0] > 0 and supports_selection(task_vectors)


def ties_elect(
    task_vectors: torch.Tensor, coefficients: Sequence[float], mean: bool, lambdas: Sequence[float] | None = None
) -> torch.Tensor:
    """TIES' election and disjoint merge of float32 ``(K, n)`` task vectors in one pass (eight columns at a
    time, every row's entries in registers), the merged vector written into ``task_vectors[0]`` and
    returned; the other rows are left as they are.

    The same float32 operations in the same order as ATen's :func:`~clpeft.merging.methods.generalized.combine`
    (bit for bit); with ``lambdas`` each row is first trimmed as ``torch.hardshrink(row, lambdas[t])`` would
    (TIES' trim fused in). Columns are split over the torch threads."""
    k, n = task_vectors.shape
    rows = (ctypes.c_void_p * k)(*[row.data_ptr() for row in task_vectors])
    weights = (ctypes.c_float * k)(*coefficients)
    shrink = None if lambdas is None else (ctypes.c_float * k)(*lambdas)

    def run(columns: tuple[int, int]) -> None:
        start, stop = columns
        offset = start * task_vectors.element_size()
        part = (ctypes.c_void_p * k)(*[pointer + offset for pointer in rows])
        _library().clpeft_ties_elect(stop - start, k, part, shrink, weights, int(mean), rows[0] + offset)

    _run_all(run, _column_ranges(n, n * k))
    return task_vectors[0]


def count_magnitude_digits(rows: torch.Tensor, shift: int, prefixes: Sequence[int], counts: torch.Tensor) -> None:
    """One sweep of the model-scope trim's radix selection (:mod:`~clpeft.merging.methods.model_trim`):
    for each row ``t`` of the contiguous float32 ``(K, n)`` ``rows``, add to ``counts[t, d]`` the number of
    ``|rows[t]|`` whose 16-bit digit at ``shift`` (16 or 0) is ``d`` and whose higher bits equal ``prefixes[t]``.
    ``counts``: int64 ``(K, 2^16)``, each row contiguous. Rows run on the torch threads, one row each at a time."""
    _check_digit_counts(shift, counts, rows.shape[0])
    n, library = rows.shape[1], _library()

    def run(t: int) -> None:
        library.clpeft_count_magnitude_digits(rows[t].data_ptr(), n, shift, prefixes[t], counts[t].data_ptr())

    _run_all(run, range(rows.shape[0]), workers=_threads_for(n * rows.shape[0]))


def supports_difference_counts(sources: Sequence[torch.Tensor], base: torch.Tensor) -> bool:
    """Whether :func:`count_difference_digits` applies: a flat contiguous float32 ``base`` and flat contiguous
    ``sources`` of the kernel's dtypes (at least ``base``'s length, aligned) on the CPU, and a compiled kernel."""
    return (
        base.dtype == torch.float32
        and all(_readable(t) and t.dim() == 1 for t in (base, *sources))
        and all(_compiled(s.dtype) and s.numel() >= base.numel() for s in sources)
    )


def count_difference_digits(
    sources: Sequence[torch.Tensor], base: torch.Tensor, shift: int, prefixes: Sequence[int], counts: torch.Tensor
) -> None:
    """:func:`count_magnitude_digits` of the task vectors ``sources[t].float() - base`` without forming them:
    each is computed a 2,048-entry chunk at a time in a cached row (the same values as
    :func:`~clpeft.merging.blocks.subtract_rows`), so a sweep reads each input once and writes nothing."""
    _check_digit_counts(shift, counts, len(sources))
    n, library = base.numel(), _library()

    def run(t: int) -> None:
        source = sources[t]
        code = _DTYPE_CODES[source.dtype]
        library.clpeft_count_difference_digits(code, n, source.data_ptr(), base.data_ptr(), shift, prefixes[t], counts[t].data_ptr())

    _run_all(run, range(len(sources)), workers=_threads_for(n * len(sources)))


def band_magnitudes(
    values: torch.Tensor | Sequence[torch.Tensor],
    lowers: Sequence[int],
    uppers: Sequence[int],
    bands: Sequence[torch.Tensor],
    found: torch.Tensor,
    tally: torch.Tensor,
    base: torch.Tensor | None = None,
) -> None:
    """One tensor of the whole-model trim's bracketed sweep (:mod:`~clpeft.merging.methods.model_bracket`):
    for each task ``t``, add to ``tally[t]`` how many magnitudes lie above ``uppers[t]``, at it and at
    ``lowers[t]`` (IEEE bit patterns, sign cleared), and append those strictly between to ``bands[t]`` from
    ``found[t]`` on, while they fit; ``found[t]`` counts them all.

    Args:
        values: contiguous float32 ``(K, n)`` task vectors; or, with ``base``, the K flat fine-tuned
            tensors, whose task vectors ``values[t].float() - base`` are formed a 2,048-entry chunk at a
            time in a cached row, never written (:func:`supports_difference_counts` says where).
        found: int64 ``(K,)``; tally: int64 ``(K, 3)``, contiguous.
        base: the flat float32 base, for fine-tuned ``values``.
    """
    n, library = (values.shape[1] if base is None else base.numel()), _library()

    def run(t: int) -> None:
        bracket = (lowers[t], uppers[t], bands[t].data_ptr(), bands[t].numel(), found[t:].data_ptr(), tally[t].data_ptr())
        if base is None:
            library.clpeft_band_magnitudes(values[t].data_ptr(), n, *bracket)
        else:
            source = values[t]
            library.clpeft_band_differences(_DTYPE_CODES[source.dtype], n, source.data_ptr(), base.data_ptr(), *bracket)

    _run_all(run, range(len(values)), workers=_threads_for(n * len(values)))


def _check_digit_counts(shift: int, counts: torch.Tensor, rows: int) -> None:
    if shift not in (0, 16) or counts.dtype != torch.int64 or counts.stride(1) != 1 or counts.shape != (rows, 1 << 16):
        raise ValueError("digit counts need shift 0 or 16 and int64 counts of shape (K, 2^16), each row contiguous")


def _threads_for(entries: int) -> int:
    """Threads for ``entries`` of work: the torch threads, at most one per ``_MIN_ENTRIES_PER_THREAD``."""
    if entries < 2 * _MIN_ENTRIES_PER_THREAD or getattr(_whole_tensors, "active", False):
        return 1
    return max(1, min(torch.get_num_threads(), entries // _MIN_ENTRIES_PER_THREAD))


def _column_ranges(n: int, entries: int) -> list[tuple[int, int]]:
    """``[start, stop)`` ranges covering ``n`` columns, one per thread for ``entries`` of work: :func:`_spans`
    of one tensor."""
    return [(start, stop) for span in _spans([n], _threads_for(entries)) for _, start, stop in span]


def _spans(lengths: Sequence[int], threads: int) -> list[list[tuple[int, int, int]]]:
    """Tensors of ``lengths`` entries, end to end, cut into ``threads`` spans of equal length: per span, its
    ``(tensor, start, stop)`` pieces. Each tensor takes its length rounded up to ``_ALIGN`` entries, so cuts
    inside a tensor fall on a multiple of ``_ALIGN``."""
    places = [-(-n // _ALIGN) * _ALIGN for n in lengths]
    step = max(_ALIGN, -(-sum(places) // threads // _ALIGN) * _ALIGN)
    spans: list[list[tuple[int, int, int]]] = [[] for _ in range(threads)]
    offset = 0
    for index, (n, place) in enumerate(zip(lengths, places)):
        start = 0
        while start < n:
            span = (offset + start) // step
            stop = min(n, (span + 1) * step - offset)
            spans[span].append((index, start, stop))
            start = stop
        offset += place
    return [span for span in spans if span]


def _run_all(run, items, workers: int | None = None) -> None:
    """``run(item)`` for every item: on this thread for one worker, else the first item here and the
    others on the pool (a hand-off fewer: waking a thread costs ~0.1 ms on a VM)."""
    items = list(items)
    workers = min(len(items), workers or len(items))
    if workers <= 1:
        for item in items:
            run(item)
        return
    pending = [_pool(workers - 1).submit(run, item) for item in items[1:]]
    try:
        run(items[0])
    finally:  # an error or an interrupt here returns only once no thread writes any more
        wait(pending)
    for future in pending:
        future.result()


def share(tasks: Sequence[tuple[int, Callable[[], T]]]) -> list[T]:
    """Run ``tasks`` (each its entries of work and a call) over the torch threads, whole tasks to each
    thread, and return their results in order.

    Each thread takes a share of the tasks (largest first, to the least loaded) and runs the compiled
    loops of its calls on its own, so a batch of tensors costs one hand-off per thread where
    splitting every tensor costs one per tensor. A task of more than ``1 / threads`` of the work runs
    first, here, split over the threads as usual; so does a task under ``_MIN_SHARED_ENTRIES`` (threads
    taking turns at the GIL for the Python around small loops lose more than they share). The calls
    must not share buffers.
    """
    threads = min(torch.get_num_threads(), len(tasks))
    total = sum(entries for entries, _ in tasks)
    results: list = [None] * len(tasks)
    alone = [i for i, (entries, _) in enumerate(tasks) if threads < 2 or entries * threads > total or entries < _MIN_SHARED_ENTRIES]
    for i in alone:
        results[i] = tasks[i][1]()
    shares: list[list[int]] = [[] for _ in range(threads)]
    loads = [0] * threads
    for i in sorted(set(range(len(tasks))).difference(alone), key=lambda i: (-tasks[i][0], i)):  # largest first, then in order
        lightest = loads.index(min(loads))
        shares[lightest].append(i)
        loads[lightest] += tasks[i][0]

    def run(indices: list[int]) -> None:
        _whole_tensors.active = True
        try:
            for i in indices:
                results[i] = tasks[i][1]()
        finally:
            _whole_tensors.active = False

    _run_all(run, [indices for indices in shares if indices])
    return results


@functools.cache
def _pool(workers: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(workers, thread_name_prefix="clpeft-merge")


# C signatures of linear_merge.c's entry points: name -> (return type, argument types)
_i32, _i64, _u32, _f32, _ptr = ctypes.c_int, ctypes.c_int64, ctypes.c_uint32, ctypes.c_float, ctypes.c_void_p
_ptrs, _floats = ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(ctypes.c_float)
_BRACKET = [_u32, _u32, _ptr, _i64, _ptr, _ptr]  # lower, upper, band, its capacity, found, tally
_SIGNATURES = {
    "clpeft_supports_dtype": (_i32, [_i32]),
    # dtype, n, k, base, sources, coefficients, out, sums (float64), origin, run, count, step, conflicts (int64), scratch
    "clpeft_linear_merge": (_i32, [_i32, _i64, _i32, _ptr, _ptrs, _floats, _ptr, _ptr, _i64, _i64, _i64, _i64, _ptr, _ptr]),
    "clpeft_linear_merge_scratch": (_i64, []),
    # dtype, n, k, base, sources, run, count, step
    "clpeft_sign_conflicts": (_i64, [_i32, _i64, _i32, _ptr, _ptrs, _i64, _i64, _i64]),
    # dtype, n, source, base (float32), out (float32), squares (float64)
    "clpeft_subtract": (_i32, [_i32, _i64, _ptr, _ptr, _ptr, _ptr]),
    # dtype of out, n, base (float32), delta (float32), out, sums (3 float64)
    "clpeft_finish": (_i32, [_i32, _i64, _ptr, _ptr, _ptr, _ptr]),
    # values, n, k, counts (int64 scratch), band (float32 scratch), band capacity
    "clpeft_kth_largest_magnitude": (_f32, [_ptr, _i64, _i64, _ptr, _ptr, _i64]),
    # values, n, shift, prefix, counts (int64)
    "clpeft_count_magnitude_digits": (None, [_ptr, _i64, _i32, _u32, _ptr]),
    # dtype, n, source, base (float32), shift, prefix, counts (int64)
    "clpeft_count_difference_digits": (_i32, [_i32, _i64, _ptr, _ptr, _i32, _u32, _ptr]),
    # n, k, rows, lambdas (NULL: no trim), coefficients, mean, out
    "clpeft_ties_elect": (None, [_i64, _i32, _ptrs, _floats, _floats, _i32, _ptr]),
    "clpeft_band_magnitudes": (None, [_ptr, _i64, *_BRACKET]),  # values, n, bracket
    "clpeft_band_differences": (_i32, [_i32, _i64, _ptr, _ptr, *_BRACKET]),  # dtype, n, source, base (float32), bracket
}


@functools.cache
def _library() -> ctypes.CDLL | None:
    """The compiled kernel, built into the cache on first use; ``None`` when it cannot be built."""
    source = resources.files("clpeft.merging").joinpath("linear_merge.c").read_bytes()
    compiler = _compiler()
    if compiler is None:
        _log.warning("no C compiler found (set CC): linear merges on the CPU use ATen ops, ~3x slower")
        return None
    try:
        path = _build(source, compiler)
    except (OSError, subprocess.SubprocessError) as error:
        _log.warning("the CPU merge kernel did not compile (%s): linear merges use ATen ops, ~3x slower", error)
        return None
    if not _private(path):
        _log.warning(
            "not loading %s: it or its folder is writable by other users or not owned by you (a planted library "
            "would run as you); linear merges use ATen ops, ~3x slower. Remove it, or fix the permissions",
            path,
        )
        return None
    return _load(path)


def _load(path: Path) -> ctypes.CDLL:
    """A built kernel library with the argument and return types of its entry points declared."""
    library = ctypes.CDLL(str(path))
    for name, (restype, argtypes) in _SIGNATURES.items():
        function = getattr(library, name)
        function.restype, function.argtypes = restype, argtypes
    return library


def _compiler() -> list[str] | None:
    """``$CC``, else Python's own compiler, else ``cc``: as an argument list, when it exists."""
    for command in (os.environ.get("CC"), sysconfig.get_config_var("CC"), "cc"):
        if command:
            words = shlex.split(command)
            if words and shutil.which(words[0]):
                return words
    return None


def _build(source: bytes, compiler: list[str]) -> Path:
    """Compile ``source`` unless a library built from the same source, compiler and CPU is cached."""
    version = subprocess.run([*compiler, "--version"], capture_output=True, check=True, timeout=60).stdout
    identity = hashlib.sha256(b"\0".join([source, version, " ".join([*compiler, *_MODE_FLAGS]).encode(), _cpu_identity()])).hexdigest()[:16]
    directory = kernels_cache_dir()
    path = directory / f"linear_merge-{identity}.so"
    if path.is_file():
        return path
    directory.mkdir(parents=True, exist_ok=True, mode=0o700)
    with tempfile.TemporaryDirectory(dir=directory) as scratch:
        source_path = Path(scratch) / "linear_merge.c"
        source_path.write_bytes(source)
        built = Path(scratch) / path.name
        errors = b""
        for arch in _ARCH_FLAGS:
            result = subprocess.run([*compiler, *_MODE_FLAGS, *arch, str(source_path), "-o", str(built)], capture_output=True, timeout=300)
            if result.returncode == 0:
                built.chmod(0o755)  # whatever the umask: _private() loads only what others cannot write
                os.replace(built, path)  # atomic: a concurrent build leaves one whole library
                return path
            errors = result.stderr
        raise subprocess.SubprocessError(errors.decode(errors="replace").strip().splitlines()[-1] if errors.strip() else "compiler failed")


def _private(path: Path) -> bool:
    """Whether ``path`` and its folder belong to this user and nobody else can write them."""
    for item in (path, path.parent):
        info = item.stat()
        if (hasattr(os, "getuid") and info.st_uid != os.getuid()) or info.st_mode & 0o022:
            return False
    return True


def _cpu_identity() -> bytes:
    """What ``-march=native`` depends on: the CPU model and its feature flags."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return f"{platform.machine()} {platform.processor()}".encode()
    wanted = ("model name", "flags", "Features", "CPU part", "CPU implementer")
    return "\n".join(sorted({line for line in lines if line.split(":")[0].strip() in wanted})).encode()
