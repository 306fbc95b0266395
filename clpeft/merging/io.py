"""Checkpoint input and output for merging: tensor sources, a streaming safetensors writer.

Merge methods never see files; they see tensors. This module turns checkpoints into
:class:`TensorSource` objects that read one tensor at a time, and writes the merged
checkpoint incrementally.

Reading uses positioned reads into buffers the caller owns and reuses, not memory maps.
``safetensors.torch.load_file`` maps the whole file, and every mapped page it touches counts
toward the process's resident memory (3.7 GiB of inputs for eight ViT-B fine-tunes,
DESIGN.md). Dropping each tensor's pages after use (``madvise(MADV_DONTNEED)``) keeps a mapped
reader's resident memory low too, and saves the copy, but with two torch threads it made
reading plus subtracting 1.7x slower on our 2-core VM (presumably the TLB shootdowns of
dropping pages that both threads touched), so the reader copies each tensor once from the
page cache instead.

safetensors cannot append to a file, so :class:`SafetensorsWriter` writes the format itself:
an 8-byte little-endian header length, the JSON header (padded with spaces to 8 bytes) and
the tensors' bytes back to back in header order. The header is known before the first tensor
is merged (shapes and dtypes come from the base), so nothing is ever rewritten. It writes to
a temporary file that is renamed into place only when every tensor was written
(:func:`~clpeft.merging.output.atomic_output`).
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Protocol

import torch

from clpeft.errors import UserError
from clpeft.merging.header import DTYPES, parse_header
from clpeft.merging.output import OutputFile

__all__ = [
    "SafetensorsSource",
    "SafetensorsWriter",
    "StateDictSource",
    "TensorInfo",
    "TensorSource",
    "checkpoint_files",
    "open_checkpoint",
]

_DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
_MAX_HEADER_BYTES = 100 * 1024 * 1024  # safetensors' own limit


@dataclass(frozen=True)
class TensorInfo:
    """What a header says about one tensor, without reading it."""

    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * self.dtype.itemsize


class TensorSource(Protocol):
    """Named tensors that can be inspected without reading them and read one at a time."""

    description: str
    """The file or object the tensors come from, as error messages should name it."""

    def keys(self) -> list[str]: ...

    def info(self, key: str) -> TensorInfo: ...

    def view(self, key: str) -> torch.Tensor:
        """The bytes of ``key`` as a flat uint8 tensor, without copying where possible
        (memory-mapped files, in-memory tensors), on the device the tensor lives on (the CPU
        for files). Read it, never write to it."""

    def flat(self, key: str) -> torch.Tensor:
        """``key`` as a flat tensor of its own dtype: :meth:`view`'s bytes reinterpreted, without the
        round trip through uint8 where the source holds typed tensors. Read it, never write to it."""

    def release(self, key: str) -> None:
        """Done with :meth:`view` of ``key``: a memory-mapped source drops its pages from this
        process's resident memory (they stay in the page cache)."""

    def read(self, key: str) -> torch.Tensor:
        """The tensor ``key`` (a new CPU tensor, or the caller's own for in-memory sources)."""

    def metadata(self) -> dict[str, str]: ...

    def close(self) -> None: ...


class StateDictSource:
    """A :class:`TensorSource` over an in-memory state dict.

    Args:
        tensors: name -> tensor.
        description: how error messages name this state dict (e.g. "model 2").
    """

    def __init__(self, tensors: Mapping[str, torch.Tensor], description: str):
        self._tensors = tensors
        self.description = description
        self._infos: dict[str, TensorInfo] = {}  # asked about a dozen times per tensor by a merge

    def keys(self) -> list[str]:
        return list(self._tensors)

    def info(self, key: str) -> TensorInfo:
        info = self._infos.get(key)
        if info is None:
            t = self._tensors[key]
            info = self._infos[key] = TensorInfo(t.dtype, tuple(t.shape))
        return info

    def view(self, key: str) -> torch.Tensor:
        return self.flat(key).view(torch.uint8)

    def flat(self, key: str) -> torch.Tensor:
        tensor = self._tensors[key]
        if tensor.requires_grad or not tensor.is_contiguous():  # two ATen calls fewer for the usual tensor
            tensor = tensor.detach().contiguous()
        return tensor.view(-1)

    def release(self, key: str) -> None:
        """Nothing to release."""

    def read(self, key: str) -> torch.Tensor:
        return self._tensors[key].detach()

    def metadata(self) -> dict[str, str]:
        return {}

    def close(self) -> None:
        """Nothing to close."""


@dataclass(frozen=True)
class _Entry:
    info: TensorInfo
    file: int  # index into the source's list of files
    offset: int  # absolute byte offset of the data in that file


class SafetensorsSource:
    """A :class:`TensorSource` over one or several safetensors files (shards).

    Opening reads and validates the headers only: a truncated file or a malformed header is
    reported at once, naming the file. Tensors are read on demand from a private memory map of
    each file (no copy through a read buffer; :meth:`release` drops a tensor's pages from the
    resident set once it has been used, so memory stays near the tensors in flight).
    Use it as a context manager (or call :meth:`close`).

    Args:
        paths: the shard files; a tensor name may occur in only one of them.
        description: how error messages name this checkpoint (default: the path).
    """

    def __init__(self, paths: Sequence[str | os.PathLike], description: str | None = None):
        self.paths = [Path(p) for p in paths]
        self.description = description or (str(self.paths[0]) if len(self.paths) == 1 else str(self.paths[0].parent))
        self._files: list[BinaryIO] = []
        self._maps: dict[int, mmap.mmap] = {}
        self._entries: dict[str, _Entry] = {}
        self._metadata: dict[str, str] = {}
        try:
            for index, path in enumerate(self.paths):
                self._open(index, path)
        except BaseException:
            self.close()
            raise

    def _open(self, index: int, path: Path) -> None:
        try:
            f = open(path, "rb", buffering=0)  # noqa: SIM115 (closed by close())
        except OSError as exc:
            raise UserError(f"cannot read checkpoint file {path}: {exc.strerror}") from None
        self._files.append(f)
        size = os.fstat(f.fileno()).st_size
        head = f.read(8)
        if len(head) < 8:
            raise UserError(f"{path} is not a safetensors file (only {size} bytes); re-save or re-download it")
        (header_len,) = struct.unpack("<Q", head)
        if header_len > min(_MAX_HEADER_BYTES, size - 8):
            raise UserError(f"{path} is not a safetensors file or is truncated (header of {header_len} bytes in a {size}-byte file)")
        data_start = 8 + header_len
        metadata, entries = parse_header(path, f.read(header_len), size - data_start)
        self._metadata.update(metadata)
        for name, (dtype, shape, begin) in entries.items():
            if name in self._entries:
                other = self.paths[self._entries[name].file]
                raise UserError(f"tensor '{name}' occurs in two shards, {other} and {path}")
            self._entries[name] = _Entry(TensorInfo(dtype, shape), index, data_start + begin)

    def keys(self) -> list[str]:
        """Tensor names in file order (shard by shard, by data offset), for sequential reads."""
        return sorted(self._entries, key=lambda k: (self._entries[k].file, self._entries[k].offset))

    def info(self, key: str) -> TensorInfo:
        return self._entries[key].info

    def _map(self, index: int) -> mmap.mmap:
        if index not in self._maps:
            # copy-on-write: a writable buffer for torch.frombuffer, and no write ever reaches the file
            self._maps[index] = mmap.mmap(self._files[index].fileno(), 0, access=mmap.ACCESS_COPY)
        return self._maps[index]

    def view(self, key: str) -> torch.Tensor:
        entry = self._entries[key]
        if entry.info.nbytes == 0:
            return torch.empty(0, dtype=torch.uint8)
        return torch.frombuffer(self._map(entry.file), dtype=torch.uint8, count=entry.info.nbytes, offset=entry.offset)

    def flat(self, key: str) -> torch.Tensor:
        return self.view(key).view(self.info(key).dtype)

    def release(self, key: str) -> None:
        entry = self._entries[key]
        start = entry.offset - entry.offset % mmap.PAGESIZE
        end = entry.offset + entry.info.nbytes
        end -= end % mmap.PAGESIZE  # whole pages only: a neighbour's first page may still be in use
        if end > start and hasattr(mmap, "MADV_DONTNEED"):
            self._map(entry.file).madvise(mmap.MADV_DONTNEED, start, end - start)

    def read(self, key: str) -> torch.Tensor:
        info = self.info(key)
        return self.view(key).clone().view(info.dtype).view(info.shape)

    def metadata(self) -> dict[str, str]:
        return dict(self._metadata)

    def close(self) -> None:
        for m in self._maps.values():
            try:
                m.close()
            except BufferError:  # a tensor still views it: the map closes when that tensor is freed
                pass
        self._maps.clear()
        for f in self._files:
            f.close()
        self._files.clear()

    def __enter__(self) -> SafetensorsSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def checkpoint_files(path: str | os.PathLike) -> list[Path]:
    """The safetensors files of a checkpoint given as a file, a shard index or a directory.

    Accepted forms:
        * ``model.safetensors``;
        * ``model.safetensors.index.json`` (the Hugging Face shard index, ``weight_map``);
        * a directory holding an index, or ``*.safetensors`` files (all of them, as shards);
        * a run directory: the last (by name) safetensors file, or directory of them, in its
          ``checkpoints/``.

    Raises:
        UserError: if nothing usable is found; the message lists what was looked for.
    """
    path = Path(path)
    if path.is_file():
        return _index_files(path) if path.name.endswith(".json") else [path]
    if not path.is_dir():
        raise UserError(f"checkpoint not found: {path}")
    indexes = sorted(path.glob("*.safetensors.index.json"))
    if indexes:
        return _index_files(indexes[0])
    files = sorted(path.glob("*.safetensors"))
    if files:
        return files
    for candidate in sorted((path / "checkpoints").glob("*"), reverse=True):
        if candidate.suffix == ".safetensors" or (candidate.is_dir() and any(candidate.glob("*.safetensors"))):
            return checkpoint_files(candidate)
    raise UserError(
        f"no safetensors checkpoint in {path}: expected *.safetensors, a *.safetensors.index.json "
        "or a run directory whose checkpoints/ holds safetensors files"
    )


def _index_files(index: Path) -> list[Path]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError, RecursionError) as exc:
        raise UserError(f"{index} is not a safetensors shard index with a 'weight_map' ({exc})") from None
    if not isinstance(weight_map, dict) or not all(isinstance(name, str) for name in weight_map.values()):
        raise UserError(f"{index}: 'weight_map' must map tensor names to shard file names")
    return [index.parent / name for name in dict.fromkeys(weight_map.values())]


def open_checkpoint(path: str | os.PathLike) -> SafetensorsSource:
    """Open a checkpoint (see :func:`checkpoint_files`) for tensor-by-tensor reading."""
    return SafetensorsSource(checkpoint_files(path), description=str(path))


class SafetensorsWriter:
    """Writes a safetensors file tensor by tensor, in a fixed order known up front.

    Args:
        file: an open binary file positioned at its start (e.g. an :func:`~clpeft.merging.output.atomic_output`).
        tensors: (name, info) of every tensor, in the order :meth:`write` will be called.
        metadata: string -> string ``__metadata__`` entries.
    """

    def __init__(self, file: BinaryIO | OutputFile, tensors: Sequence[tuple[str, TensorInfo]], metadata: Mapping[str, str]):
        self._file = file
        self._expected = list(tensors)
        self._written = 0
        header: dict[str, Any] = {"__metadata__": dict(metadata)} if metadata else {}
        offset = 0
        for name, info in self._expected:
            header[name] = {
                "dtype": _DTYPE_NAMES[info.dtype],
                "shape": list(info.shape),
                "data_offsets": [offset, offset + info.nbytes],
            }
            offset += info.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        file.write(struct.pack("<Q", len(raw)))
        file.write(raw)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append the next tensor; its name, dtype and shape must match the declared ones."""
        expected_name, info = self._expected[self._written]
        if name != expected_name or tensor.dtype != info.dtype or tuple(tensor.shape) != info.shape:
            raise RuntimeError(f"writer expected {expected_name} {info}, got {name} {tensor.dtype} {tuple(tensor.shape)}")
        data = tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8)
        self._file.write(memoryview(data.numpy()))
        self._written += 1

    def finish(self) -> None:
        """Check that every declared tensor was written."""
        if self._written != len(self._expected):
            missing = self._expected[self._written][0]
            raise RuntimeError(f"writer closed after {self._written} of {len(self._expected)} tensors (next: {missing})")
