"""Sharded, resumable merges: checkpoints larger than memory, written shard by shard.

A merge into a directory writes a transformers-style sharded checkpoint
(``model-00001-of-0000N.safetensors`` ... plus ``model.safetensors.index.json``), one shard at a
time as the engine produces its tensors (:class:`~clpeft.merging.engine.MergeEngine`). Each shard
is a temporary file renamed into place when its last tensor is written
(:func:`~clpeft.merging.output.atomic_output`); the index comes last, so a directory with an index
is a finished merge.

Memory. Inputs are memory-mapped and each batch's pages leave the resident set once written;
the engine reuses one work buffer sized for the largest tensor; shards are written with
unbuffered ``write`` calls straight from the merged tensor (no shard buffer). Peak resident
memory above the process's baseline (Python, torch: about 0.6 GiB) is therefore independent of
the model's size and of the number of shards: about ``(K + 1) x max(L, 8 MiB)`` of mapped input
pages plus ``L`` for the output tensor plus ``(K + 6) x L32`` of float32 work memory for a method
that forms whole task vectors (TIES, DARE, SLERP, ...), with ``K`` the number of fine-tuned
models, ``L`` the largest tensor's bytes in its dtype and ``L32`` its bytes in float32; linear
methods on the CPU work in cached blocks of ``2^18`` columns instead. :func:`rss_bound` states it
(with 32 MiB of slack); a slow test in tests/merging/test_sharded_merge.py measures it (Llama-7B's
layout at 1/4 width, K = 2: TIES peaks 283 MB above the baseline for a bound of 361 MB, task
arithmetic 81 MB for 103 MB, for 2.35 GiB of inputs). For Llama-2-7B itself (``L`` = 262 MB in
bf16, the embedding) and K = 2 that is about 1.1 GB (task arithmetic) and 5.3 GB (TIES).

Resume. After each shard is renamed into place, a progress file (``.clpeft-merge-progress.json``,
written atomically) records its size and BLAKE2b hash, the tensors' report statistics and a
fingerprint of the merge: every input file's path, size and modification time, and the method,
parameters, rules, seed, device type, output dtype and shard size. ``resume=True`` checks the
fingerprint (a changed input or setting is a one-line error naming it), keeps each recorded
shard whose size and hash still match (in order, up to the first that does not) and merges the
rest. Tensors of a resumed merge are equal bit for bit to an uninterrupted merge's: the engine
merges each tensor on its own (seeds per tensor name), and a whole-model statistic (TIES'
``trim_scope: model``) still sweeps every tensor.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import reprlib
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import ExitStack
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypedDict

import torch
from tqdm.auto import tqdm

from clpeft.errors import UserError
from clpeft.merging.blocks import BLOCK_COLUMNS
from clpeft.merging.engine import MergeEngine
from clpeft.merging.io import SafetensorsWriter, TensorInfo
from clpeft.merging.output import atomic_output, check_outputs
from clpeft.merging.report import MergeReport, TensorReport
from clpeft.merging.rules import TensorJob

__all__ = [
    "INDEX_NAME",
    "PROGRESS_NAME",
    "ShardRecord",
    "ShardedOptions",
    "fingerprint",
    "parse_size",
    "plan_shards",
    "progress_bar",
    "rss_bound",
    "write_sharded",
    "write_sharded_report",
]

INDEX_NAME = "model.safetensors.index.json"
PROGRESS_NAME = ".clpeft-merge-progress.json"
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-z]*)\s*$", re.IGNORECASE)
_UNITS = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9, "kib": 1 << 10, "mib": 1 << 20}
_UNITS["gib"] = 1 << 30
_HASH_CHUNK = 16 << 20
_SLACK = 32 << 20  # allocator and interpreter growth during a merge (rss_bound)

Fingerprint = dict[str, Any]


def parse_size(value: int | str, *, key: str = "shard_size") -> int:
    """Bytes from ``5000000000``, ``"5GB"``, ``"5G"``, ``"500MB"`` or ``"2GiB"`` (at least 1).

    (mergekit's ``--out-shard-size 5B`` means five billion: write ``5G`` here.)
    """
    match = _SIZE.match(str(value))
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS or float(match.group(1)) * _UNITS[unit] < 1:
        raise UserError(f"not a size: {value!r}; give bytes or a number with K, M, G, KiB, MiB or GiB, e.g. 5G", key=key)
    return int(float(match.group(1)) * _UNITS[unit])


def plan_shards(infos: Sequence[tuple[str, TensorInfo]], shard_bytes: int) -> list[list[int]]:
    """Split tensors, in order, into shards of at most ``shard_bytes`` (a larger tensor alone).

    Returns:
        Per shard, the indices of its tensors (consecutive).
    """
    shards: list[list[int]] = []
    size = 0
    for i, (_, info) in enumerate(infos):
        if not shards or (shards[-1] and size + info.nbytes > shard_bytes):
            shards.append([])
            size = 0
        shards[-1].append(i)
        size += info.nbytes
    return shards


def rss_bound(infos: Sequence[TensorInfo], num_models: int, *, linear: bool, batch_bytes: int = 8 << 20) -> int:
    """The resident memory a streaming merge adds to its process (see the module docstring).

    With ``K = num_models``, ``L`` the largest tensor's bytes, ``L32`` its bytes in float32 and
    ``B = batch_bytes`` (the engine reads small tensors together up to ``B`` per input):
    ``(K + 1) max(L, B)`` mapped input pages + ``L`` for the output tensor + work memory +
    32 MiB of allocator and interpreter slack. Work memory is ``(K + 2)`` float32 rows of
    ``min(N, 2^18)`` entries for a linear method on the CPU (cached blocks), else ``(K + 6) L32``:
    the task vectors, the float32 base, the merged task vector, their sum and the method's
    temporaries (measured for TIES, the most demanding of the tested methods).
    """
    largest = max((info.nbytes for info in infos), default=0)
    largest32 = max((info.numel * 4 for info in infos), default=0)
    inputs = (num_models + 1) * max(largest, batch_bytes) + largest
    if linear:
        work = (num_models + 2) * min(largest32, BLOCK_COLUMNS * 4)
    else:
        work = (num_models + 6) * largest32
    return inputs + work + _SLACK


@dataclass(frozen=True)
class ShardRecord:
    """One finished shard, as the progress file records it."""

    file: str
    bytes: int
    blake2b: str


class _HashingFile:
    """Counts and hashes what is written through it."""

    def __init__(self, file):
        self._file = file
        self.digest = hashlib.blake2b()
        self.nbytes = 0

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        self.digest.update(view)
        self.nbytes += len(view)
        return self._file.write(view)


def _file_digest(path: Path) -> tuple[int, str]:
    """Size and BLAKE2b hash of a file, read in chunks into one reused buffer."""
    digest = hashlib.blake2b()
    buffer = bytearray(_HASH_CHUNK)
    view = memoryview(buffer)
    size = 0
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buffer):
            digest.update(view[:n])
            size += n
    return size, digest.hexdigest()


def _input_state(paths: Sequence[Path]) -> list[list[Any]]:
    """``[path, size, mtime_ns]`` of each input file: what a resume checks for changes."""
    state = []
    for path in paths:
        st = os.stat(path)
        state.append([str(Path(path).resolve()), st.st_size, st.st_mtime_ns])
    return state


def fingerprint(inputs: Mapping[str, Sequence[Path]], settings: Mapping[str, Any]) -> dict[str, Any]:
    """What must be unchanged for a merge to resume: input files (by description) and settings."""
    return {
        "inputs": {name: _input_state(paths) for name, paths in inputs.items()},
        "settings": json.loads(json.dumps(settings, default=str, sort_keys=True)),
    }


def _changed(old: Mapping[str, Any], new: Mapping[str, Any]) -> str | None:
    """What differs between two fingerprints, in words (None: nothing)."""
    for name, state in new["inputs"].items():
        if old.get("inputs", {}).get(name) != state:
            return f"{name} changed (its files' paths, sizes or modification times)"
    for key, value in new["settings"].items():
        if old.get("settings", {}).get(key) != value:
            return f"the setting '{key}' changed ({reprlib.repr(old.get('settings', {}).get(key))} -> {reprlib.repr(value)})"
    if old.get("settings", {}).keys() != new["settings"].keys():
        return "the merge settings changed"
    return None


def _write_json(path: Path, data: Any) -> None:
    with atomic_output(path) as f:
        f.write(json.dumps(data, indent=1).encode())


def _kept_shards(out: Path, progress: Path, stamp: Fingerprint, names: Sequence[str]) -> list[ShardRecord]:
    """The recorded shards of an interrupted merge that are still intact (see the module docstring).

    Raises:
        UserError: the fingerprint differs (names what changed), or the progress file is unreadable.
    """
    if not progress.is_file():
        return []
    try:
        recorded = json.loads(progress.read_text())
        old_print, shards = recorded["fingerprint"], [ShardRecord(**s) for s in recorded["shards"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"cannot resume into {out}: {progress.name} is unreadable ({exc}); merge again without --resume") from None
    change = _changed(old_print, stamp)
    if change is not None:
        raise UserError(f"cannot resume into {out}: {change} since the interrupted merge; merge again without --resume")
    kept = []
    for shard, name in zip(shards, names):
        path = out / shard.file
        if shard.file != name or not path.is_file() or (shard.bytes, shard.blake2b) != _file_digest(path):
            break
        kept.append(shard)
    return kept


class _ShardSink:
    """The engine's sink: writes tensors into the shards in order, records each finished shard."""

    def __init__(
        self,
        out: Path,
        names: Sequence[str],
        infos: Sequence[tuple[str, TensorInfo]],
        shards: Sequence[Sequence[int]],
        metadata: Mapping[str, str],
        on_finished: Callable[[ShardRecord], None],
        first: int,
        on_tensor: Callable[[TensorJob], None] | None,
    ):
        self._out, self._names, self._infos, self._shards = out, names, infos, shards
        self._metadata, self._on_finished, self._on_tensor = metadata, on_finished, on_tensor
        self._shard = first  # the shard being written
        self._stack: ExitStack | None = None
        self._reports: list[TensorReport] = []

    def __call__(self, job: TensorJob, tensor: torch.Tensor) -> None:
        if self._stack is None:
            self._open()
        dtype = self._infos[self._next][1].dtype
        self._writer.write(job.name, tensor if tensor.dtype == dtype else tensor.to(dtype))
        self._next += 1
        if self._on_tensor is not None:
            self._on_tensor(job)
        if self._next == self._shards[self._shard][-1] + 1:
            self._close()

    def _open(self) -> None:
        self._stack = ExitStack()
        f = self._stack.enter_context(atomic_output(self._out / self._names[self._shard]))
        self._file = _HashingFile(f)
        indices = self._shards[self._shard]
        self._writer = SafetensorsWriter(self._file, [self._infos[i] for i in indices], self._metadata)
        self._next = indices[0]

    def _close(self) -> None:
        self._writer.finish()
        stack, self._stack = self._stack, None
        stack.close()  # renames the shard into place
        record = ShardRecord(self._names[self._shard], self._file.nbytes, self._file.digest.hexdigest())
        self._shard += 1
        self._on_finished(record)

    def abort(self, *exc_info) -> bool:
        """Remove the shard being written (an error or an interruption); never swallows the error."""
        if self._stack is not None:
            stack, self._stack = self._stack, None
            stack.__exit__(*exc_info)
        return False


class ShardedOptions(TypedDict, total=False):
    """The keywords that :func:`~clpeft.merging.merge_files` and :func:`~clpeft.merging.slices.merge_slices`
    share for a sharded merge (their defaults apply to those left out)."""

    device: str
    seed: int
    shard_size: int | str
    resume: bool
    progress: str
    on_shard: Callable[[ShardRecord], None] | None


def progress_bar(jobs: Sequence[TensorJob], desc: str, progress: str) -> tqdm:
    """A bar of the bytes written, on stderr: ``progress`` ``always``, ``never``, or ``auto`` (on a terminal)."""
    return tqdm(
        total=sum(job.info.nbytes for job in jobs),
        desc=desc,
        unit="B",
        unit_scale=True,
        disable=not (progress == "always" or (progress == "auto" and sys.stderr.isatty())),
        dynamic_ncols=True,
        file=sys.stderr,
    )


def write_sharded(
    out: Path,
    jobs: Sequence[TensorJob],
    engine_for: Callable[[Mapping[str, Any]], MergeEngine],
    parameters_of: Callable[[TensorJob], Mapping[str, Any]],
    *,
    dtype: torch.dtype | None,
    shard_bytes: int,
    metadata: Mapping[str, str],
    stamp: Fingerprint,
    resume: bool,
    on_shard: Callable[[ShardRecord], None] | None = None,
    on_tensor: Callable[[TensorJob], None] | None = None,
    inputs: Sequence[Path] = (),
) -> tuple[list[TensorReport], int]:
    """Merge ``jobs`` into shards under ``out`` (see the module docstring).

    Args:
        out: the output directory.
        jobs: every output tensor, in order.
        engine_for: builds the engine for one set of method parameters.
        parameters_of: the method parameters of a job; consecutive jobs with equal parameters are
            merged by one engine (mergekit's per-tensor filters and layer gradients).
        dtype: cast floating outputs to this dtype (None: the base's).
        shard_bytes: the largest shard (a larger tensor gets a shard of its own).
        metadata: each shard's ``__metadata__``.
        stamp: the merge's :func:`fingerprint`.
        resume: keep the intact shards an interrupted merge recorded.
        on_shard: called with each shard once it is in place and recorded.
        on_tensor: called after each tensor is written (a progress bar).
        inputs: every file and directory the merge reads; no shard may replace one
            (:func:`~clpeft.merging.output.check_outputs`).

    Returns:
        The statistics of the tensors merged by this call (a kept shard's tensors are listed by
        name and shape only) and the number of shards kept from an interrupted merge.
    """
    infos = [(job.name, _out_info(job.info, dtype)) for job in jobs]
    shards = plan_shards(infos, shard_bytes)
    names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    check_outputs({f"shard {name}": out / name for name in names}, inputs)
    progress = out / PROGRESS_NAME
    records = _kept_shards(out, progress, stamp, names) if resume else []
    kept = len(records)
    done = sum(len(shards[i]) for i in range(kept))
    reports = [TensorReport(job.name, list(job.info.shape), job.merge) for job in jobs[:done]]

    def finished(record: ShardRecord) -> None:
        records.append(record)
        _write_json(progress, {"fingerprint": stamp, "shards": [asdict(r) for r in records]})
        if on_shard is not None:
            on_shard(record)

    sink = _ShardSink(out, names, infos, shards, metadata, finished, kept, on_tensor)
    if not kept:
        _write_json(progress, {"fingerprint": stamp, "shards": []})
    with ExitStack() as stack:
        stack.push(sink.abort)
        offset = 0
        for group in _groups(jobs, parameters_of):
            start, offset = max(0, done - offset), offset + len(group)
            if start < len(group):
                reports += engine_for(parameters_of(group[0])).run(group, sink, start=start)
    _write_json(out / INDEX_NAME, _index(infos, shards, names))
    progress.unlink(missing_ok=True)
    return reports, kept


def _out_info(info: TensorInfo, dtype: torch.dtype | None) -> TensorInfo:
    return TensorInfo(dtype, info.shape) if dtype is not None and info.dtype.is_floating_point else info


def _groups(jobs: Sequence[TensorJob], parameters_of: Callable[[TensorJob], Mapping[str, Any]]) -> list[list[TensorJob]]:
    """Runs of consecutive jobs with equal parameters."""
    groups: list[list[TensorJob]] = []
    previous = None
    for job in jobs:
        key = json.dumps(parameters_of(job), sort_keys=True, default=str)
        if key != previous:
            groups.append([])
            previous = key
        groups[-1].append(job)
    return groups


def _index(infos: Sequence[tuple[str, TensorInfo]], shards: Sequence[Sequence[int]], names: Sequence[str]) -> dict[str, Any]:
    """The Hugging Face shard index: total bytes and tensor name -> shard file."""
    weight_map = {infos[i][0]: name for shard, name in zip(shards, names) for i in shard}
    return {"metadata": {"total_size": sum(info.nbytes for _, info in infos)}, "weight_map": weight_map}


def write_sharded_report(
    out: Path,
    jobs: Sequence[TensorJob],
    engine_for: Callable[[Mapping[str, Any]], MergeEngine],
    parameters_of: Callable[[TensorJob], Mapping[str, Any]],
    *,
    report: MergeReport,
    report_path: Path,
    bar: tqdm,
    start: float,
    **options: Any,
) -> MergeReport:
    """:func:`write_sharded` into ``out`` (created), advancing ``bar``; then ``report`` with its
    statistics, the seconds since ``start`` (``time.perf_counter``) and the shards kept by a resume,
    written to ``report_path``. ``options``: the other keywords of :func:`write_sharded`."""
    out.mkdir(parents=True, exist_ok=True)
    report.tensors, kept = write_sharded(out, jobs, engine_for, parameters_of, on_tensor=lambda job: bar.update(job.info.nbytes), **options)
    report.seconds = time.perf_counter() - start
    with atomic_output(report_path) as r:
        r.write(json.dumps({**report.to_dict(), "resumed_shards": kept}, indent=1).encode())
    return report
