"""The JSON header of a safetensors file, checked against the format before any tensor is read.

The format (https://github.com/huggingface/safetensors#format): an 8-byte little-endian length,
that many bytes of a UTF-8 JSON object, then the data section. Every key but ``__metadata__``
names a tensor: ``dtype``, ``shape`` (non-negative integers) and ``data_offsets`` ``[begin,
end]`` into the data section, ``end - begin`` bytes for that dtype and shape. Sorted by offset,
the ranges are contiguous, from byte 0 to the end of the file, without gaps or overlaps; the
optional ``__metadata__`` maps strings to strings. The safetensors library refuses files that
break any of this ("invalid offset", "incomplete metadata"); :func:`parse_header` refuses the
same files, each with one line that names the file and the problem, so a hostile header is
never read as weights (a negative offset reaches back into the header) and never makes the
reader recurse or quote it at length.
"""

from __future__ import annotations

import json
import reprlib
from pathlib import Path
from typing import Any

import torch

from clpeft.errors import UserError

__all__ = ["DTYPES", "parse_header"]

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U64": torch.uint64,
    "U32": torch.uint32,
    "U16": torch.uint16,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}

_BRIEF = reprlib.Repr()  # quotes names and values of a hostile header in bounded space
_BRIEF.maxstring = _BRIEF.maxother = 120


def _naturals(value: Any) -> bool:
    """A JSON list of non-negative integers (not booleans, which Python counts as integers)."""
    return isinstance(value, list) and all(type(v) is int and v >= 0 for v in value)


def _entry(path: Path, name: str, spec: Any) -> tuple[torch.dtype, tuple[int, ...], int, int]:
    """``(dtype, shape, begin, end)`` of one tensor's header entry."""
    where = f"{path}: tensor {_BRIEF.repr(name)}"
    if not isinstance(spec, dict):
        raise UserError(f"{where} has a header entry that is not an object ({_BRIEF.repr(spec)})")
    dtype, shape, offsets = spec.get("dtype"), spec.get("shape"), spec.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise UserError(f"{where} has an unknown dtype {_BRIEF.repr(dtype)} (known: {', '.join(DTYPES)})")
    if not _naturals(shape):
        raise UserError(f"{where}: shape must be a list of non-negative integers, not {_BRIEF.repr(shape)}")
    if not (_naturals(offsets) and len(offsets) == 2 and offsets[0] <= offsets[1]):
        raise UserError(f"{where}: data_offsets must be [begin, end] with 0 <= begin <= end, not {_BRIEF.repr(offsets)}")
    declared = offsets[1] - offsets[0]
    nbytes = 0 if 0 in shape else DTYPES[dtype].itemsize
    for dim in shape:
        nbytes *= dim
        if nbytes > declared:  # no need to multiply out a hostile shape
            break
    if nbytes != declared:
        raise UserError(f"{where} declares {declared} bytes for shape {_BRIEF.repr(shape)} {dtype}")
    return DTYPES[dtype], tuple(shape), offsets[0], offsets[1]


def _check_coverage(path: Path, ranges: list[tuple[int, int, str]], data_size: int) -> None:
    """The ``(begin, end, name)`` ranges tile the ``data_size``-byte data section exactly."""
    position, previous = 0, None
    for begin, end, name in sorted(ranges):
        if end > data_size:
            raise UserError(
                f"{path} is truncated: tensor {_BRIEF.repr(name)} ends at byte {end} of a {data_size}-byte data "
                "section; re-save or re-download it"
            )
        if begin < position:
            raise UserError(f"{path}: tensors {_BRIEF.repr(previous)} and {_BRIEF.repr(name)} overlap in the file")
        if begin > position:
            raise UserError(f"{path}: bytes {position}-{begin} of the data section belong to no tensor")
        position, previous = end, name
    if position != data_size:
        raise UserError(f"{path}: bytes {position}-{data_size} of the data section belong to no tensor")


def parse_header(path: Path, raw: bytes, data_size: int) -> tuple[dict[str, str], dict[str, tuple]]:
    """Validate the header bytes ``raw`` of ``path``, whose data section has ``data_size`` bytes.

    Returns:
        The ``__metadata__`` and, per tensor name, ``(dtype, shape, begin)`` with ``begin``
        relative to the data section.

    Raises:
        UserError: naming ``path`` and the first problem found.
    """
    try:
        header = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise UserError(f"{path} has a safetensors header that is not UTF-8 text; re-save or re-download it") from None
    except RecursionError:
        raise UserError(f"{path} has a safetensors header nested too deeply; re-save or re-download it") from None
    except ValueError as exc:  # JSON syntax, or an integer too long to convert
        raise UserError(f"{path} has a malformed safetensors header ({exc}); re-save or re-download it") from None
    if not isinstance(header, dict):
        raise UserError(f"{path} has a malformed safetensors header (not a JSON object)")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise UserError(f"{path}: __metadata__ must map strings to strings, not {_BRIEF.repr(metadata)}")
    entries = {name: _entry(path, name, spec) for name, spec in header.items()}
    _check_coverage(path, [(begin, end, name) for name, (_, _, begin, end) in entries.items()], data_size)
    return metadata, {name: (dtype, shape, begin) for name, (dtype, shape, begin, _) in entries.items()}
