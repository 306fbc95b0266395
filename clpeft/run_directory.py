"""A run directory's ownership and identity: one process at a time, never someone else's files.

* :class:`RunLock` — an exclusive ``flock`` on ``<dir>/.lock`` for as long as a run is in it.
  The kernel drops it when the process dies (even by SIGKILL), so it never goes stale; a
  second run on the same directory stops at once, naming the process that holds it.
* :func:`run_files` — what in a directory a run would write over, so a new run never replaces
  a finished run's results (even one whose ``checkpoints/`` were pruned) or a user's own
  ``config.yaml`` in a directory that is not a run at all.
* :func:`config_changes` and :func:`fixed_changes` — how a resumed config differs from the
  stored one, and which of those differences ``--force`` cannot accept because the stored
  checkpoints belong to another stream.
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from clpeft.errors import UserError

__all__ = ["RUN_FILES", "RunLock", "config_changes", "fixed_changes", "format_changes", "run_files"]

# Everything a run writes at the top of its directory.
RUN_FILES = ("config.yaml", "metrics.json", "events.jsonl", "model.safetensors", "checkpoints", "source", "tb")
# Scenario keys that locate the data without changing the stream it gives.
_RELOCATING = {"scenario.root", "scenario.download"}


class RunLock:
    """Holds ``<directory>/.lock`` exclusively until :meth:`release` or the process ends.

    Raises:
        UserError: another live process holds the directory.
    """

    def __init__(self, directory: Path):
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / ".lock"
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise UserError(f"{directory} is in use by another clpeft run (pid {holder}); wait for it to end "
                            f"or choose another --out") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd: int | None = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None


def run_files(directory: Path) -> list[str]:
    """The entries of :data:`RUN_FILES` present in ``directory``."""
    return [name for name in RUN_FILES if (directory / name).exists()]


def config_changes(stored, current, prefix: str = "") -> list[tuple[str, object, object]]:
    """``(key path, stored value, current value)`` for every leaf that differs (``out`` aside)."""
    if not (isinstance(stored, dict) and isinstance(current, dict)):
        return [] if stored == current else [(prefix.rstrip("."), stored, current)]
    changes = []
    for key in sorted(set(stored) | set(current), key=str):
        a, b = stored.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            changes += config_changes(a, b, f"{prefix}{key}.")
        elif a != b and f"{prefix}{key}" != "out":
            changes.append((f"{prefix}{key}", a, b))
    return changes


def fixed_changes(changes: list[tuple[str, object, object]]) -> list[tuple[str, object, object]]:
    """The changes a resumed run cannot take: the seed and the scenario (its data, order and split)."""
    return [c for c in changes if (c[0] == "seed" or c[0].startswith("scenario")) and c[0] not in _RELOCATING]


def format_changes(changes: list[tuple[str, object, object]], limit: int = 5) -> str:
    shown = "; ".join(f"{key}: {a!r} -> {b!r}" for key, a, b in changes[:limit])
    return shown + (f"; and {len(changes) - limit} more" if len(changes) > limit else "")
