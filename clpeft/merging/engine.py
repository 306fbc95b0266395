"""The merge engine: runs a tensor merge method over a checkpoint, tensor by tensor, on a device.

For each output tensor the engine takes the base tensor and the K fine-tuned tensors,
subtracts the base from each into one ``(K, N)`` buffer (the task vectors), computes the
statistics of the merge report, calls the method, adds the base back and hands the result
to a sink (a state dict, or the streaming safetensors writer). LoRA adapters supply their
task vectors from their factors instead (:mod:`~clpeft.merging.lora`).

Linear methods (task arithmetic, mean) never form a whole tensor's task vectors. On the CPU a
compiled loop reads each input entry once and keeps everything else in registers
(:mod:`~clpeft.merging.fused_cpu`; with several torch threads a batch's tensors are shared whole
between them, the largest split across them); without a C compiler the task vectors are formed, measured
and combined one block of columns at a time while the block is in the caches, so main memory
sees the inputs once instead of the ``(K, N)`` buffer three times. On CUDA one Triton kernel
per tensor does the same in registers (:mod:`~clpeft.merging.fused`).
TIES' trim and DARE's masks need whole task vectors and use the buffer. On the CPU, bf16 and
fp16 inputs are converted to float32 once per block and never computed on in their own dtype
(:mod:`~clpeft.merging.blocks`).

Methods that need a statistic of the whole model first (TIES with ``trim_scope: model``, whose
cut-off is one magnitude per task over the flattened model, as in the official code) get two
passes: pass 1 streams every merged tensor's task vectors through the method's
:class:`~clpeft.merging.registry.ModelStatistic` (as many sweeps as it asks for: two for a
float32 model), holding only the statistic; pass 2 is the usual merge, tensor by tensor, with
the statistic's result. Each sweep reads the inputs once more, in the same bounded memory.

Memory: on the CPU the inputs are read straight from memory maps of the files (no copy into
a read buffer); each batch's pages leave the resident set once it is written, and the task
vectors go to one work buffer allocated for the largest tensor and reused, so peak memory stays
near ``(K + 2)`` times the largest tensor plus the method's per-row temporaries, whatever the
model size.

Devices: the same code runs on CPU and CUDA. Off the CPU each batch is packed into one host
buffer per input (pinned for CUDA) and moves with one non-blocking copy per buffer, so
consecutive small tensors (biases, norms) travel together (up to ``batch_bytes`` per input);
statistics stay on the device until the batch is written, and the next batch is read from
disk while the device computes the current one. Batches whose tensors already live on the
merge device (in-memory state dicts on the GPU) are not copied at all, and with
``keep_on_device`` the merged tensors stay there too.

On the CPU, merges that write files (``overlap_writes``) compute batch ``i + 1`` in a worker
thread while the main thread hands batch ``i`` to the writer, the two alternating between two
output buffers; writing, kernel time, then hides behind the arithmetic.

In-memory and streaming merges run this same code on the same batches, so their results are
equal bit for bit.

Finiteness: the report's statistics already prove most outputs finite at no extra cost (finite
norms of the inputs and of the merged task vector, and ``||theta_0|| + ||tau_m||``, a bound on
every entry, well inside the output dtype's range). Only a tensor they cannot vouch for is
looked at again: an input holding NaN or inf is named, finite inputs that merge into NaN or inf
(a huge ``scale``, a float16 overflow) are an error, and statistics that merely overflowed
float32 (sums of squares past 3.4e38, e.g. entries of 1e20) are recomputed in float64.
"""

from __future__ import annotations

import hashlib
import math
import reprlib
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, NoReturn

import torch

from clpeft.errors import UserError
from clpeft.merging import fused, fused_cpu
from clpeft.merging.blocks import BLOCK_COLUMNS, combine_linear, compute_dtype, subtract_rows
from clpeft.merging.io import TensorInfo, TensorSource
from clpeft.merging.lora import LoraAdapter, merge_factors
from clpeft.merging.registry import MergeMethod, ModelShape
from clpeft.merging.report import TensorReport, pack_host_sums, pack_stats, pack_sums, sample_entries, sign_conflict, unpack_stats
from clpeft.merging.rules import TensorJob

__all__ = ["MergeEngine", "Sink"]

Sink = Callable[[TensorJob, torch.Tensor], None]
"""Receives each output tensor in job order; the tensor is only valid during the call."""

Packed = torch.Tensor | list[float]  # pack_stats' values; the host kernel's in Python floats
_ALIGN = 64  # byte alignment of each tensor inside a packed transfer buffer


def _aligned(nbytes: int) -> int:
    return -(-nbytes // _ALIGN) * _ALIGN


def _flat(buffer: torch.Tensor, offset: int, info: TensorInfo) -> torch.Tensor:
    """The tensor stored at ``offset`` of a uint8 buffer, flat (a source's typed flat view as it is)."""
    if offset == 0 and buffer.dtype == info.dtype and buffer.numel() == info.numel:  # TensorSource.flat's
        return buffer
    if offset == 0 and buffer.numel() == info.nbytes:  # a source's own bytes: no slice
        return buffer.view(info.dtype)
    return buffer[offset : offset + info.nbytes].view(info.dtype)


def _typed(buffer: torch.Tensor, offset: int, info: TensorInfo) -> torch.Tensor:
    """The tensor stored at ``offset`` of a uint8 buffer, in its shape."""
    return _flat(buffer, offset, info).view(info.shape)


def _sampled_conflict(base: torch.Tensor, sources: Sequence[torch.Tensor]) -> torch.Tensor:
    """The report's sign conflict of the task vectors ``sources[k] - base``, from samples only
    (converted to the compute dtype before any arithmetic); counted in the compiled loop where it applies."""
    if base.device.type == "cpu" and fused_cpu.supports(base, sources, base):
        return fused_cpu.sign_conflict(base, sources)
    k, dtype = len(sources), compute_dtype(base.dtype)
    sample = torch.stack([sample_entries(s, k).to(dtype) for s in sources]) - sample_entries(base, k).to(dtype)
    return sign_conflict(sample)


def _finite_stats(values: list[float]) -> bool:
    """Every packed statistic (:func:`~clpeft.merging.report.pack_stats`) but the sign conflict,
    which is NaN for LoRA merges, is finite."""
    return all(math.isfinite(v) for i, v in enumerate(values) if i != 1)


def _surely_finite(values: list[float], dtype: torch.dtype) -> bool:
    """Whether a merged tensor's packed statistics prove it finite (see the module docstring)."""
    return _finite_stats(values) and values[0] + values[2] < torch.finfo(dtype).max / 2


def _tensor_seed(seed: int, name: str) -> int:
    """A per-tensor seed that depends on the merge seed and the name, not on processing order."""
    digest = hashlib.blake2b(f"{seed}/{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


@dataclass
class _Staged:
    """One batch of jobs and their inputs on the host (views, not copies): uint8 bytes to pack for a
    device, or for a host merge flat tensors of their own dtype (:meth:`TensorSource.flat`)."""

    jobs: list[TensorJob]
    bases: list[torch.Tensor]  # per job: the base tensor
    models: list[list[torch.Tensor] | None]  # per job: each fine-tuned tensor (None: not read)


@dataclass
class _InFlight:
    """A computed batch whose outputs may still be copying back from the device."""

    jobs: list[TensorJob]
    outputs: list[torch.Tensor]
    stats: list[Packed | None]  # None: not merged
    done: torch.cuda.Event | None


class MergeEngine:
    """Runs one tensor-scope merge method over a list of :class:`TensorJob`.

    Args:
        method: a registered method with ``scope == "tensor"``.
        params: its validated parameters.
        base: the base checkpoint.
        models: the fine-tuned checkpoints, all full (:class:`TensorSource`) or all LoRA.
        device: where the arithmetic runs.
        seed: seeds the per-tensor generator of random methods (DARE).
        batch_bytes: consecutive tensors are read and copied together up to this many bytes
            per input; a larger tensor forms a batch of its own.
        keep_on_device: hand the sink the merged tensors on ``device`` instead of host copies.
        keep_outputs: the sink keeps the merged tensors it receives (an in-memory merge): each
            is allocated for it (or is ``outputs[name]``), instead of written into a host buffer
            reused from batch to batch.
        outputs: with ``keep_outputs`` on the CPU, the tensors to write the merged tensors into, by
            name (checked by the caller: shapes, dtypes, contiguous, apart from the inputs).
        overlap_writes: on the CPU, compute the next batch in a worker thread while the sink
            writes the current one (for sinks that write files).
        fused: merge linear methods with the one-pass kernels (:mod:`clpeft.merging.fused` on
            CUDA, :mod:`clpeft.merging.fused_cpu` on the CPU); ``False`` forms them op by op
            (for side-by-side timings).
    """

    def __init__(
        self,
        method: MergeMethod,
        params: Mapping[str, Any],
        base: TensorSource,
        models: Sequence[TensorSource | LoraAdapter],
        *,
        device: torch.device | str = "cpu",
        seed: int = 0,
        batch_bytes: int = 8 << 20,
        keep_on_device: bool = False,
        keep_outputs: bool = False,
        overlap_writes: bool = False,
        fused: bool = True,
        outputs: Mapping[str, torch.Tensor] | None = None,
    ):
        self.method = method
        self.params = dict(params)
        self.base = base
        self.models = list(models)
        self.device = torch.device(device)
        self.seed = seed
        self.batch_bytes = batch_bytes
        self.keep_on_device = keep_on_device
        self.keep_outputs = keep_outputs
        self.overlap_writes = overlap_writes
        self.fused = fused
        self.outputs = outputs
        self._adapters = [m for m in self.models if isinstance(m, LoraAdapter)]
        self._full = [m for m in self.models if not isinstance(m, LoraAdapter)]
        # Off the CPU each batch is copied to the device from fresh host buffers, pinned for CUDA.
        self._transfer = self.device.type != "cpu"
        self._pin = self.device.type == "cuda"
        self._buffers: dict[str, torch.Tensor] = {}
        self._coefficients_by_dtype: dict[torch.dtype, list[float]] = {}
        self._device_coefficients: torch.Tensor | None = None
        self._model_statistic: dict[str, Any] = {}  # pass 1's result, for the method's model_statistic

    # ------------------------------------------------------------------ driver

    def run(self, jobs: Sequence[TensorJob], sink: Sink, *, start: int = 0) -> list[TensorReport]:
        """Merge every job and pass each output to ``sink`` in order; return the statistics.

        ``start`` skips the first jobs (a resumed merge, :mod:`~clpeft.merging.sharded`); a
        whole-model statistic still sees every job.

        Raises:
            UserError: when a base or fine-tuned tensor holds NaN or infinity, when finite ones
                merge into NaN or infinity, or when a merged variance statistic is negative.
        """
        self._model_statistic = self._whole_model_pass(jobs)
        if self.overlap_writes and not self._transfer:
            return self._run_overlapped(jobs[start:], sink)
        reports: list[TensorReport] = []
        in_flight: deque[_InFlight] = deque()
        lookahead = 1 if self._transfer else 0  # read batch i+1 while the device computes batch i
        for batch in self._batches(jobs[start:]):
            in_flight.append(self._compute(self._stage(batch)))
            while len(in_flight) > lookahead:
                reports += self._finish(in_flight.popleft(), sink)
        while in_flight:
            reports += self._finish(in_flight.popleft(), sink)
        return reports

    def _run_overlapped(self, jobs: Sequence[TensorJob], sink: Sink) -> list[TensorReport]:
        """The host's pipeline: one worker thread computes batch ``i + 1`` while this thread hands
        batch ``i`` to the sink (writing a file is kernel time that would otherwise wait for the
        arithmetic). Batches alternate between two output buffers, so the one being written is
        never the one being filled. The sink runs here, in the main thread, so a signal stops a
        merge at once: only the batch being computed is waited for."""
        reports: list[TensorReport] = []
        with ThreadPoolExecutor(1, thread_name_prefix="clpeft-merge") as worker:
            computing: Future[_InFlight] | None = None
            for i, batch in enumerate(self._batches(jobs)):
                following = worker.submit(self._compute, self._stage(batch), f"out/{i % 2}")
                if computing is not None:
                    reports += self._finish(computing.result(), sink)
                computing = following
            if computing is not None:
                reports += self._finish(computing.result(), sink)
        return reports

    def _whole_model_pass(self, jobs: Sequence[TensorJob]) -> dict[str, Any]:
        """Pass 1: the method's whole-model statistic, from every merged tensor's task vectors
        (``{}`` for methods without one; see the module docstring)."""
        factory = self.method.model_statistic
        if factory is None:
            return {}
        merged = [job for job in jobs if job.merge and not job.average]
        dtype = max((compute_dtype(job.info.dtype) for job in merged), key=lambda d: d.itemsize, default=torch.float32)
        names = tuple(job.name for job in merged)
        shape = ModelShape(sum(job.info.numel for job in merged), len(self.models), dtype, self.device, names)
        statistic = factory(self.params, shape)
        if statistic is None:
            return {"model_statistic": None}
        while statistic.wants_sweep():
            for job, base, rows in self._each_input(merged):
                if not self._observe_inputs(statistic, job, base, rows):
                    statistic.observe(self._task_vectors(job, base, rows)[0])
            statistic.end_sweep()
        return {"model_statistic": statistic.result()}

    def _each_input(self, jobs: Sequence[TensorJob]) -> Iterator[tuple[TensorJob, torch.Tensor, Any]]:
        """Each job with its flat base in the compute dtype and its fine-tuned rows, read as the merge
        reads them (the buffers are reused: each is valid until the next is requested)."""
        for batch in self._batches(jobs):
            staged = self._stage(batch)
            if self._transfer and not self._on_device(staged):
                bases, models = self._to_device(staged)
            else:
                bases, models = staged.bases, staged.models
            for job, base, rows in zip(batch, bases, models):
                yield job, self._in_compute_dtype(_typed(base, 0, job.info)), rows
            if not self._transfer:  # off the CPU the views were released once copied
                self._release(batch)

    def _observe_inputs(self, statistic: Any, job: TensorJob, base: torch.Tensor, rows) -> bool:
        """Give a statistic that can count task vectors without forming them the inputs themselves
        (full models on the host); ``False`` where it did not."""
        observe = getattr(statistic, "observe_differences", None)
        if observe is None or self._adapters or self._transfer or not observe(self._sources(job, rows), base):
            return False
        for model in self._full:  # their pages are read: they leave the resident set now
            model.release(job.name)
        return True

    def _batches(self, jobs: Sequence[TensorJob]) -> Iterator[list[TensorJob]]:
        batch: list[TensorJob] = []
        size = 0
        for job in jobs:
            nbytes = _aligned(job.info.nbytes)
            if batch and size + nbytes > self.batch_bytes:
                yield batch
                batch, size = [], 0
            batch.append(job)
            size += nbytes
        if batch:
            yield batch

    # ------------------------------------------------------------------ reading

    def _host_buffer(self, role: str, nbytes: int) -> torch.Tensor:
        """A uint8 host buffer. On the CPU one per role, grown and reused, so large buffers do
        not page-fault on every tensor; off the CPU a fresh one per batch (pinned for CUDA; the
        caching host allocator recycles it once its copies are done)."""
        if self._transfer:
            return torch.empty(nbytes, dtype=torch.uint8, pin_memory=self._pin)
        buffer = self._buffers.get(role)
        if buffer is None or buffer.numel() < nbytes:
            buffer = self._buffers[role] = torch.empty(nbytes, dtype=torch.uint8)
        return buffer[:nbytes]

    def _stage(self, jobs: list[TensorJob]) -> _Staged:
        """A batch's inputs: views of the sources (memory maps or in-memory tensors), no copy
        (except in-memory tensors on an accelerator for a CPU merge, which come to the host)."""
        return _Staged(
            jobs,
            [self._view(self.base, job) for job in jobs],
            [[self._view(m, job) for m in self._full] if job.merge and self._full else None for job in jobs],
        )

    def _view(self, source: TensorSource, job: TensorJob) -> torch.Tensor:
        """A tensor's bytes to pack for the device, or on the host its flat typed view."""
        if self._transfer:
            return source.view(job.name)
        view = source.flat(job.name)
        return view.cpu() if view.device.type != "cpu" else view

    def _on_device(self, staged: _Staged) -> bool:
        """Every tensor of the batch already lives on the merge device (so none is copied)."""
        views = [*staged.bases, *(v for rows in staged.models if rows is not None for v in rows)]
        return self.device.type != "cpu" and all(v.device == self.device for v in views)

    def _release(self, jobs: list[TensorJob]) -> None:
        """Drop the sources' pages of a finished batch from the resident set."""
        for job in jobs:
            self.base.release(job.name)
            if job.merge:
                for model in self._full:
                    model.release(job.name)

    def _to_device(self, staged: _Staged) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
        """Pack the batch into one host buffer per input (pinned for CUDA), move each with one
        non-blocking copy, and slice the device copies back per job: base bytes, and a
        ``(K, bytes)`` block of fine-tuned bytes that the merge may overwrite."""
        base_offsets, model_offsets = [], []
        base_size = model_size = 0
        for job, rows in zip(staged.jobs, staged.models):
            base_offsets.append(base_size)
            base_size += _aligned(job.info.nbytes)
            model_offsets.append(None if rows is None else model_size)
            if rows is not None:
                model_size += _aligned(max(r.numel() for r in rows))
        base = self._host_buffer("base", base_size)
        models = self._host_buffer("models", len(self._full) * model_size).view(len(self._full), model_size)
        for job, view, rows, b_off, m_off in zip(staged.jobs, staged.bases, staged.models, base_offsets, model_offsets):
            base[b_off : b_off + job.info.nbytes].copy_(view)
            if rows is not None:
                for row, raw in zip(models, rows):
                    row[m_off : m_off + raw.numel()].copy_(raw)
        self._release(staged.jobs)
        base, models = base.to(self.device, non_blocking=True), models.to(self.device, non_blocking=True)
        return (
            [base[o : o + job.info.nbytes] for job, o in zip(staged.jobs, base_offsets)],
            [None if o is None else models[:, o:] for o in model_offsets],
        )

    # ------------------------------------------------------------------ arithmetic

    def _compute(self, staged: _Staged, out_role: str = "out") -> _InFlight:
        if self._transfer and not self._on_device(staged):
            bases, models = self._to_device(staged)
        else:
            bases, models = staged.bases, staged.models
        outputs: list[torch.Tensor] = []
        stats: list[torch.Tensor | None] = []
        destinations = self._destinations(staged.jobs, out_role)
        merged_by_kernel = self._kernel_merges(staged.jobs, bases, models, destinations)
        for index, (job, staged_base, base, rows, out) in enumerate(zip(staged.jobs, staged.bases, bases, models, destinations)):
            if not job.merge:  # the base's tensor, from where it was read
                outputs.append(self._output(_typed(staged_base, 0, job.info)))
                stats.append(None)
                continue
            if index in merged_by_kernel:
                merged, packed = merged_by_kernel[index]
            else:
                merged, packed = self._merge(job, _typed(base, 0, job.info), rows, out)
            if not self._transfer:  # its inputs are read: their pages leave while earlier outputs are written
                self._release([job])
            outputs.append(self._output(merged))
            stats.append(packed if isinstance(packed, list) else self._to_host(packed))
        done = None
        if self._pin:
            done = torch.cuda.Event()
            done.record()
        return _InFlight(staged.jobs, outputs, stats, done)

    def _destinations(self, jobs: list[TensorJob], role: str) -> list[torch.Tensor | None]:
        """On the CPU, where each merged tensor of a batch is written: its slice of one host
        buffer reused from batch to batch (sinks consume an output during their call), so large
        outputs do not page-fault fresh memory every time; with ``keep_outputs`` a tensor of its
        own. Off the CPU outputs are allocated where they are computed (``None``)."""
        if self._transfer:
            return [None] * len(jobs)
        if self.keep_outputs and self.outputs is not None:
            return [self.outputs[job.name] if job.merge else None for job in jobs]
        if self.keep_outputs:
            return [torch.empty(job.info.shape, dtype=job.info.dtype) if job.merge else None for job in jobs]
        offsets, size = [], 0
        for job in jobs:
            offsets.append(size)
            size += _aligned(job.info.nbytes) if job.merge else 0
        buffer = self._host_buffer(role, size)
        return [_typed(buffer, offset, job.info) if job.merge else None for job, offset in zip(jobs, offsets)]

    def _merge(self, job: TensorJob, base_raw: torch.Tensor, rows, out: torch.Tensor | None) -> tuple[torch.Tensor, Packed]:
        """The merged tensor (in ``out`` when given) and its packed report statistics, by the first
        path that applies: one kernel (linear method on CUDA), the LoRA factors (linear method,
        adapters), cached blocks (linear method on the CPU), whole task vectors (any method)."""
        linear = self.method.linear and not job.average
        if linear and self._full and self._transfer:
            sources = self._sources(job, rows)
            if self.fused and fused.supports(self.device, base_raw, sources):
                return self._merge_fused(job, base_raw.reshape(-1), sources)
        dtype = compute_dtype(base_raw.dtype)
        if linear and self._full and not self._transfer:
            return self._combine_in_blocks(job, base_raw.reshape(-1), rows, out)
        base = self._in_compute_dtype(base_raw)
        if not self._transfer and base.data_ptr() != base_raw.data_ptr():  # converted: the read pages can go
            self.base.release(job.name)
        if linear and self._adapters:
            coefficients = self._coefficients(dtype)
            delta, norms = merge_factors(self._adapters, job.name, coefficients, device=self.device, dtype=dtype)
            conflict = base.new_tensor(math.nan)
        else:
            task_vectors, squares = self._task_vectors(job, base, rows)
            norms = torch.linalg.vector_norm(task_vectors, dim=1) if squares is None else squares.sqrt()
            conflict = sign_conflict(task_vectors)
            if job.average:  # a normalisation statistic: the fine-tunes' mean, whatever the method (rules)
                delta = task_vectors.mean(dim=0)
            else:
                inputs = {"base": base, "shape": job.info.shape, "name": job.name}
                inputs = {name: inputs[name] for name in self.method.tensor_inputs}
                delta = self.method.fn(task_vectors, **self.params, **self._randomness(job), **self._model_statistic, **inputs)
        if out is not None and fused_cpu.supports_finish(base, delta, out.view(-1)):  # the add and the sums in one pass
            sums = fused_cpu.finish(base, delta, out.view(-1))
            return out, torch.cat([pack_sums(sums, conflict, base.numel()), norms.to(sums.dtype)])
        if out is None:
            merged = (base + delta).to(job.info.dtype).view(job.info.shape)
        elif out.dtype == dtype:
            merged = torch.add(base, delta, out=out.view(-1)).view(job.info.shape)
        else:  # rounded to the output dtype a block at a time (no whole-tensor float32 temporary)
            flat = out.view(-1)
            for start in range(0, flat.numel(), BLOCK_COLUMNS):
                block = slice(start, start + BLOCK_COLUMNS)
                flat[block].copy_(base[block] + delta[block])
            merged = out
        return merged, pack_stats(base, norms, conflict, delta)

    def _kernel_merges(
        self, jobs: list[TensorJob], bases: list[torch.Tensor], models: list, destinations: list[torch.Tensor | None]
    ) -> dict[int, tuple[torch.Tensor, Packed]]:
        """A batch's linear merges that the compiled kernel takes, by index in the batch, computed
        together, the torch threads sharing their entries evenly
        (:func:`~clpeft.merging.fused_cpu.linear_merges`: one hand-off per thread and batch instead of
        one per tensor); ``{}`` where that does not apply."""
        if self._transfer or not (self.fused and self.method.linear and self._full) or torch.get_num_threads() < 2:
            return {}
        merges = {}
        for index, (job, base, rows, out) in enumerate(zip(jobs, bases, models, destinations)):
            if not job.merge or job.average or out is None:
                continue
            flat, sources = _flat(base, 0, job.info), self._sources(job, rows)
            if fused_cpu.supports(flat, sources, out.view(-1)):
                merges[index] = (flat, sources, self._coefficients(compute_dtype(flat.dtype)), out.view(-1))
        results = fused_cpu.linear_merges(list(merges.values()))
        return {
            index: (destinations[index], pack_host_sums(sums, conflict, flat.numel()))
            for (index, (flat, *_)), (sums, conflict) in zip(merges.items(), results)
        }

    def _kernel_merge(self, base: torch.Tensor, sources: list[torch.Tensor], out: torch.Tensor) -> tuple[torch.Tensor, Packed]:
        """A linear method on the host in one pass of the compiled kernel, written into ``out``."""
        sums, conflict = fused_cpu.linear_merge(base, sources, self._coefficients(compute_dtype(base.dtype)), out.view(-1))
        return out, pack_host_sums(sums, conflict, base.numel())

    def _combine_in_blocks(
        self, job: TensorJob, base: torch.Tensor, rows: list[torch.Tensor], out: torch.Tensor
    ) -> tuple[torch.Tensor, Packed]:
        """A linear method on the host, written into ``out``: in one pass by the compiled kernel
        (:mod:`~clpeft.merging.fused_cpu`), else one cached block of columns at a time
        (:func:`~clpeft.merging.blocks.combine_linear`)."""
        sources = self._sources(job, rows)
        dtype = compute_dtype(base.dtype)
        if self.fused and fused_cpu.supports(base, sources, out.view(-1)):
            return self._kernel_merge(base, sources, out)
        coefficients = torch.tensor(self._coefficients(dtype), dtype=dtype)
        scratch = self._scratch(len(sources) + 2, min(base.numel(), BLOCK_COLUMNS), dtype)
        sums = combine_linear(base, sources, coefficients, out.view(-1), scratch)
        return out, pack_sums(sums, _sampled_conflict(base, sources), base.numel())

    def _merge_fused(self, job: TensorJob, base: torch.Tensor, sources: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """A linear method on the GPU in one pass (:mod:`~clpeft.merging.fused`)."""
        if self._device_coefficients is None:
            self._device_coefficients = torch.tensor(self._coefficients(torch.float32), device=self.device)
        merged = torch.empty(job.info.shape, dtype=job.info.dtype, device=self.device)
        sums = fused.linear_merge(base, sources, self._device_coefficients, merged.view(-1))
        return merged, pack_sums(sums, _sampled_conflict(base, sources), base.numel())

    def _sources(self, job: TensorJob, rows) -> list[torch.Tensor]:
        """The fine-tuned tensors of ``job``, flat and typed, from their bytes (views, no copy)."""
        infos = [m.info(job.name) for m in self._full]
        return [_flat(raw, 0, info) for raw, info in zip(rows, infos)]

    def _coefficients(self, dtype: torch.dtype) -> list[float]:
        """A linear method's ``c_k`` for task vectors of ``dtype``."""
        if dtype not in self._coefficients_by_dtype:
            self._coefficients_by_dtype[dtype] = self.method.coefficients(len(self.models), self.params, dtype)
        return self._coefficients_by_dtype[dtype]

    def _task_vectors(self, job: TensorJob, base: torch.Tensor, rows) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(K, N)`` task vectors in ``base``'s dtype, owned by the method (may be overwritten), and their
        float64 sums of squares when the compiled subtraction formed them on the way (else None).

        ``rows`` holds the fine-tuned tensors' bytes, one per model: read-only source views
        (a list), or a ``(K, bytes)`` device copy (a tensor) that may be overwritten in place.
        """
        if self._adapters:
            task_vectors = self._scratch(len(self._adapters), base.numel(), base.dtype)
            for row, adapter in zip(task_vectors, self._adapters):
                if job.name in adapter.layers:
                    row.copy_(adapter.delta(job.name, device=self.device, dtype=base.dtype))
                else:
                    row.zero_()
            return task_vectors, None
        sources = self._sources(job, rows)
        if isinstance(rows, torch.Tensor) and all(s.dtype == base.dtype for s in sources):  # in place in the copy
            return rows[:, : base.numel() * base.dtype.itemsize].view(base.dtype).sub_(base), None
        task_vectors = self._scratch(len(sources), base.numel(), base.dtype)
        if not self._transfer:  # the host converts each block once (a GPU converts as it subtracts)
            squares = []
            for row, model, source in zip(task_vectors, self._full, sources):
                squares.append(subtract_rows(row[None], [source], base))
                model.release(job.name)  # this model's pages are read: they leave the resident set now
            return task_vectors, None if any(s is None for s in squares) else torch.cat(squares)
        for row, source in zip(task_vectors, sources):
            torch.sub(source, base, out=row)
        return task_vectors, None

    def _in_compute_dtype(self, base: torch.Tensor) -> torch.Tensor:
        """A flat base tensor in its compute dtype: itself, or on the host converted into a buffer reused
        from tensor to tensor (valid until the next call; a fresh float32 copy of each bf16 tensor spent
        more time faulting in new pages than converting)."""
        dtype, flat = compute_dtype(base.dtype), base.reshape(-1)
        if flat.dtype == dtype or self._transfer:
            return flat.to(dtype)
        return self._host_buffer(f"base/{dtype}", flat.numel() * dtype.itemsize).view(dtype).copy_(flat)

    def _scratch(self, rows: int, numel: int, dtype: torch.dtype) -> torch.Tensor:
        """A ``(rows, numel)`` work buffer, reused on the CPU like the read buffers."""
        if self._transfer:
            return torch.empty(rows, numel, device=self.device, dtype=dtype)
        return self._host_buffer(f"scratch/{dtype}", rows * numel * dtype.itemsize).view(dtype).view(rows, numel)

    def _randomness(self, job: TensorJob) -> dict[str, torch.Generator]:
        if not self.method.uses_generator:
            return {}
        return {"generator": torch.Generator(device=self.device).manual_seed(_tensor_seed(self.seed, job.name))}

    def _output(self, tensor: torch.Tensor) -> torch.Tensor:
        """An output as the sink receives it: on the host, or where it is with ``keep_on_device``."""
        return tensor if self.keep_on_device else self._to_host(tensor)

    def _to_host(self, tensor: torch.Tensor) -> torch.Tensor:
        if tensor.device.type == "cpu":
            return tensor
        host = torch.empty(tensor.shape, dtype=tensor.dtype, pin_memory=self._pin)
        return host.copy_(tensor, non_blocking=True)

    # ------------------------------------------------------------------ output

    def _finish(self, flight: _InFlight, sink: Sink) -> list[TensorReport]:
        if flight.done is not None:
            flight.done.synchronize()
        reports = []
        mapped = []  # jobs whose input pages are in use again: copied base tensors, inputs read to recheck
        for job, output, packed in zip(flight.jobs, flight.outputs, flight.stats):
            if packed is None:
                reports.append(TensorReport(job.name, list(job.info.shape), merged=False))
                mapped.append(job)
            else:
                values = packed if isinstance(packed, list) else packed.tolist()
                if not _surely_finite(values, job.info.dtype):
                    values = self._recheck(job, output, values)
                    mapped.append(job)
                if job.variance and bool((output < 0).any()):
                    self._negative_variance(job)
                reports.append(unpack_stats(job.name, job.info.shape, values))
            sink(job, output)
        if not self._transfer:  # merged jobs' pages left in _compute; off the CPU the views were released once copied
            self._release(mapped)
        return reports

    def _recheck(self, job: TensorJob, output: torch.Tensor, values: list[float]) -> list[float]:
        """The statistics of a merged tensor that :func:`_surely_finite` could not vouch for.

        Raises:
            UserError: naming the input whose tensor holds NaN or inf, or, for finite inputs,
                the merged tensor that came out NaN or inf.
        """
        if _finite_stats(values) and bool(output.isfinite().all()):
            return values  # only the bound was loose
        base = self.base.read(job.name).detach().to("cpu", torch.float64).reshape(-1)
        if not base.isfinite().all():
            self._non_finite_input(job.name, f"the base {self.base.description}")
        norms = []
        for model in self.models:
            if not isinstance(model, LoraAdapter):
                weights = model.read(job.name).detach().to("cpu", torch.float64).reshape(-1)
            elif job.name in model.layers:
                weights = base + model.delta(job.name, device=base.device, dtype=base.dtype)
            else:
                weights = base
            if not weights.isfinite().all():
                self._non_finite_input(job.name, model.description)
            norms.append(torch.linalg.vector_norm(weights - base).item())
        merged = output.detach().to("cpu", torch.float64).reshape(-1)
        if not merged.isfinite().all():
            params = ", ".join(f"{k}={reprlib.repr(v)}" for k, v in self.params.items())
            raise UserError(
                f"merging tensor '{job.name}' with {self.method.name} ({params or 'no parameters'}) gave NaN or "
                f"infinite values from finite inputs: the result overflows {job.info.dtype}; lower scale or "
                "weights, or add the tensor to keep_base or skip"
            )
        delta = merged - base  # float64 statistics (of the rounded output) where float32 ones overflowed
        density = torch.count_nonzero(delta).item() / max(delta.numel(), 1)
        return [torch.linalg.vector_norm(base).item(), values[1], torch.linalg.vector_norm(delta).item(), density, *norms]

    def _non_finite_input(self, name: str, culprit: str) -> NoReturn:
        raise UserError(
            f"tensor '{name}' of {culprit} holds NaN or infinite values; fix or re-export that checkpoint, "
            "or add the tensor to keep_base or skip"
        )

    def _negative_variance(self, job: TensorJob) -> NoReturn:
        culprits = [m.description for m in self._full if bool((m.read(job.name) < 0).any())]
        raise UserError(
            f"tensor '{job.name}' is a variance (merged as the mean of the fine-tuned models' statistics) but came "
            f"out negative: {', '.join(culprits) or 'a fine-tuned model'} holds negative values; fix or re-export "
            "that checkpoint, or add the tensor to keep_base"
        )
