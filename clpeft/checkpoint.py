"""Atomic, verified, versioned checkpoints of a whole run.

A checkpoint is written to a temporary file, fsynced and renamed into place, so a reader sees
either the old file or the complete new one. Its SHA-256 is stored beside it
(``<name>.sha256``, written the same way, after the checkpoint): a checkpoint without a
matching digest is incomplete or corrupted and is never loaded silently.
A process killed at any point of :func:`save` leaves either no new checkpoint or one that
fails :func:`verify`; :func:`load_latest` then falls back to the previous good one and warns,
naming the file it skipped.

Every checkpoint records ``FORMAT_VERSION``. One written by a newer clpeft is refused with a
:class:`~clpeft.errors.UserError` (it cannot be read correctly, and resuming from an older
checkpoint instead would silently redo work); one without a readable format is skipped.

**No code runs from a checkpoint.** The digest detects damage, not tampering: whoever can replace
a checkpoint can replace its digest. So a checkpoint holds plain data only (tensors, numbers,
strings, bytes, ``None`` and lists, tuples, sets and dicts of them) and is read with
``torch.load(weights_only=True)``, which never imports a module or calls a function named in
the file; a file that asks for one is skipped as unreadable. :func:`save` refuses any other
object up front, naming where it sits in the payload, so a plug-in's extra state that would not
read back fails when it is written, not at ``--resume``.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import re
import warnings
from collections import OrderedDict
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from clpeft.errors import UserError

FORMAT_VERSION = 1
_NAME = re.compile(r"exp_(\d+)\.pt$")
# What torch.load(weights_only=True) reads back without importing anything the file names. Types
# are matched exactly: a numpy float is a float subclass, yet it pickles as a numpy global.
_PLAIN_LEAVES = frozenset(
    {torch.Tensor, torch.nn.Parameter, bool, int, float, complex, str, bytes, type(None), torch.Size, torch.dtype, torch.device}
)
_PLAIN_CONTAINERS = frozenset({list, tuple, set, dict, OrderedDict})


def plain_data_problem(obj, where: str = "payload") -> str | None:
    """``None`` when ``obj`` is plain data a checkpoint can hold, else where the first other object sits."""
    stack = [(obj, where)]
    while stack:
        value, at = stack.pop()
        kind = type(value)
        if kind in _PLAIN_LEAVES:
            continue
        if kind not in _PLAIN_CONTAINERS:
            return f"{at} is a {kind.__module__}.{kind.__qualname__}"
        if isinstance(value, dict):
            for key, item in value.items():
                if type(key) not in (str, int):
                    return f"{at} has a key of type {type(key).__qualname__} ({key!r})"
                stack.append((item, f"{at}[{key!r}]"))
        else:
            stack.extend((item, f"{at}[{i}]") for i, item in enumerate(value))
    return None


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def save(directory: Path, experience: int, payload: dict, keep: int = 2) -> Path:
    """Write the checkpoint taken after ``experience``; keep the newest ``keep`` of them.

    Raises:
        TypeError: the payload holds an object that is not plain data (see the module docstring).
    """
    problem = plain_data_problem(payload)
    if problem is not None:
        raise TypeError(
            f"a checkpoint holds plain data only (tensors, numbers, strings, lists, tuples, sets, dicts), but {problem}; "
            f"return such a value from state_dict()/get_extra_state() as a tensor or a plain value"
        )
    directory.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    torch.save({"format": FORMAT_VERSION, **payload}, buf)
    data = buf.getvalue()
    path = directory / f"exp_{experience:03d}.pt"
    _atomic_write(path, data)
    _atomic_write(path.with_name(path.name + ".sha256"), hashlib.sha256(data).hexdigest().encode())
    for stale in directory.glob(".exp_*.tmp*"):  # left by a write that was killed
        stale.unlink(missing_ok=True)
    for old in list_checkpoints(directory)[:-keep]:
        old.unlink(missing_ok=True)
        old.with_name(old.name + ".sha256").unlink(missing_ok=True)
    return path


def list_checkpoints(directory: Path) -> list[Path]:
    """Checkpoint files in ``directory``, oldest first."""
    if not directory.is_dir():
        return []
    return sorted((p for p in directory.iterdir() if _NAME.search(p.name)), key=lambda p: int(_NAME.search(p.name)[1]))


def verify(path: Path) -> str | None:
    """``None`` when ``path`` matches its digest, else the reason it does not."""
    digest = path.with_name(path.name + ".sha256")
    if not digest.exists():
        return "no checksum file (the write was interrupted)"
    if hashlib.sha256(path.read_bytes()).hexdigest() != digest.read_text().strip():
        return "checksum mismatch (truncated or corrupted)"
    return None


def load_latest(
    directory: Path, on_skip: Callable[[Path, str], None] | None = None, required: Iterable[str] = ("experience", "strategy")
) -> tuple[Path, dict] | None:
    """The newest checkpoint that verifies and reads, warning about every newer one that does not.

    Args:
        directory: the run's ``checkpoints/`` directory.
        on_skip: also called with ``(path, reason)`` for every skipped checkpoint (e.g. to log
            an event), besides the :class:`UserWarning`.
        required: keys the payload must hold; a checkpoint without one of them is skipped.

    Raises:
        UserError: the newest readable checkpoint was written in a newer format.
    """
    for path in reversed(list_checkpoints(directory)):
        payload, problem = read(path, required)
        if problem is None:
            return path, payload
        warnings.warn(f"skipping {path.name}: {problem}; falling back to an earlier checkpoint ({path})", stacklevel=2)
        if on_skip is not None:
            on_skip(path, problem)
    return None


def read(path: Path, required: Iterable[str] = ("experience", "strategy")) -> tuple[dict | None, str | None]:
    """The payload of one checkpoint file, or the reason it cannot be used (checksum, contents, format, keys).

    Only plain data is read (``weights_only=True``): a file that names a class or function to
    import is refused before anything it names is touched.

    Raises:
        UserError: the checkpoint was written in a newer format.
    """
    problem = verify(path)
    if problem is not None:
        return None, problem
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        named = re.search(r"GLOBAL (\S+)", str(exc))
        what = f"'{named[1]}'" if named else "an object that is not plain data"
        return None, f"unreadable: it asks to load {what}, and clpeft never runs code from a checkpoint"
    except Exception as exc:  # a verified file that is not a torch checkpoint at all
        return None, f"unreadable ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
    version = payload.get("format") if isinstance(payload, dict) else None
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        return None, f"not a clpeft checkpoint (format {version!r})"
    if version > FORMAT_VERSION:
        raise UserError(
            f"{path} has checkpoint format {version}, newer than the format {FORMAT_VERSION} this clpeft reads; "
            f"resume it with the clpeft version that wrote it (or a newer one)"
        )
    missing = [key for key in required if key not in payload]
    if missing:
        return None, f"incomplete checkpoint (no {', '.join(repr(k) for k in missing)})"
    experience = payload.get("experience", 0)
    if not isinstance(experience, int) or isinstance(experience, bool) or experience < 0:
        return None, f"incomplete checkpoint (experience {experience!r} is not an index)"
    if not isinstance(payload.get("strategy", {}), dict):
        return None, "incomplete checkpoint (the strategy state is not a dict)"
    return payload, None
