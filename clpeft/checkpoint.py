"""Atomic, verified checkpoints of a whole run.

A checkpoint is written to a temporary file, fsynced and renamed into place, so a reader sees
either the old file or the complete new one. Its SHA-256 is stored beside it
(``<name>.sha256``, written the same way, after the checkpoint): a checkpoint without a
matching digest is incomplete or corrupted and is never loaded silently.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import warnings
from pathlib import Path

import torch

FORMAT_VERSION = 1
_NAME = re.compile(r"exp_(\d+)\.pt$")


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
    """Write the checkpoint taken after ``experience``; keep the newest ``keep`` of them."""
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


def load_latest(directory: Path) -> tuple[Path, dict] | None:
    """The newest checkpoint that verifies, warning about every newer one that does not."""
    for path in reversed(list_checkpoints(directory)):
        problem = verify(path)
        if problem is None:
            payload = torch.load(path, map_location="cpu", weights_only=False)
            if payload.get("format") != FORMAT_VERSION:
                warnings.warn(f"skipping {path.name}: checkpoint format {payload.get('format')} != {FORMAT_VERSION}")
                continue
            return path, payload
        warnings.warn(f"skipping {path.name}: {problem}; falling back to an earlier checkpoint")
    return None
