"""A run directory's ownership and identity: one process at a time, never someone else's files.

* :class:`RunLock` — an exclusive ``flock`` on ``<dir>/.lock`` for as long as a run is in it.
  The kernel drops it when the process dies (even by SIGKILL), so it never goes stale; a
  second run on the same directory stops at once, naming the process that holds it.
* :func:`run_files` — what in a directory a run would write over, so a new run never replaces
  a finished run's results (even one whose ``checkpoints/`` were pruned) or a user's own
  ``config.yaml`` in a directory that is not a run at all.
* :func:`config_changes` and :func:`fixed_changes` — how a resumed config differs from the
  stored one, and which of those differences ``--force`` cannot accept because the stored
  checkpoints belong to another stream; :func:`prepare` applies all of the above.
* :func:`export_weights`, :func:`write_atomic` and :func:`read_source_checkpoint` — the run's
  other files.
"""

from __future__ import annotations

import fcntl
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from clpeft import checkpoint
from clpeft.config import read_yaml
from clpeft.errors import UserError

__all__ = [
    "RUN_FILES",
    "Prepared",
    "RunLock",
    "config_changes",
    "export_weights",
    "fixed_changes",
    "format_changes",
    "prepare",
    "read_source_checkpoint",
    "run_files",
    "write_atomic",
]

# Everything a run writes at the top of its directory.
RUN_FILES = ("config.yaml", "metrics.json", "events.jsonl", "model.safetensors", "checkpoints", "source", "tb", "adapters", "merged")
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
            raise UserError(
                f"{directory} is in use by another clpeft run (pid {holder}); wait for it to end or choose another --out"
            ) from None
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


@dataclass
class Prepared:
    """What :func:`prepare` found: the lock held (rank 0), the stored config and the forced changes."""

    lock: RunLock | None = None
    stored: dict | None = None
    forced: list = field(default_factory=list)


def prepare(out: Path, resolved: dict, world, *, resume: bool, force: bool) -> Prepared:
    """Lock ``out`` (rank 0), check it can take this run, and write ``config.yaml``.

    A fresh run never writes over a run's files; a resumed one may differ from the stored
    config only with ``force``, never in its stream, and then ``config.yaml`` is left for the
    caller to write once the checkpoint has loaded (the changes come back as ``forced``).

    Raises:
        UserError: ``out`` is a file, in use, holds someone's run files, or the config differs.
    """
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a directory; choose a directory for the run")
    found = Prepared(lock=RunLock(out) if world.is_main else None)
    try:
        _check(out, resolved, found, resume=resume, force=force)
    except BaseException:
        if found.lock is not None:
            found.lock.release()
        raise
    world.barrier()  # every rank has checked the directory before rank 0 writes to it
    if world.is_main and not found.forced:
        write_atomic(out / "config.yaml", yaml.safe_dump(resolved, sort_keys=False))
    world.barrier()
    return found


def _check(out: Path, resolved: dict, found: Prepared, *, resume: bool, force: bool) -> None:
    """The checks of :func:`prepare`; fills ``found.stored`` and ``found.forced``."""
    cfg_path = out / "config.yaml"
    if resume:
        if not cfg_path.is_file():
            raise UserError(f"--resume: {out} holds no run (no config.yaml); drop --resume to start one")
        found.stored = read_yaml(cfg_path)
        changes = config_changes(found.stored, resolved)
        if changes and not force:
            raise UserError(f"--resume: the config differs from the stored run ({format_changes(changes)}); pass --force to resume anyway")
        fixed = fixed_changes(changes)
        if fixed:
            raise UserError(
                f"--resume: the stored checkpoints belong to another stream ({format_changes(fixed)}); "
                f"not even --force changes that: start a new run with another --out"
            )
        found.forced = changes
    else:
        existing = run_files(out)
        if existing:
            raise UserError(f"{out} already holds a run ({', '.join(existing)}); pass --resume to continue it or choose another --out")


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path``, then rename it into place."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def export_weights(strategy, path: Path) -> Path:
    """Write the strategy's final tensors (parameters and buffers) as safetensors.

    This is what ``clpeft merge`` reads when given a run directory; names are the strategy's
    ``state_dict`` keys (``backbone.net.blocks.0.attn.qkv.weight``, ``head.weight``, ...).
    Non-tensor extra state (replay memories, statistics) stays in the checkpoints.
    """
    from safetensors.torch import save_file

    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in strategy.state_dict().items() if isinstance(v, torch.Tensor)}
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt", "producer": "clpeft"})
    tmp.replace(path)
    return path


def read_source_checkpoint(path: Path) -> dict:
    """The strategy state in a checkpoint file, or in a run directory (its ``source/`` when it
    is a test-time-adaptation run, else the newest of its ``checkpoints/``)."""
    key = "scenario.source_checkpoint"
    if path.is_dir():
        for sub in ("source", "checkpoints"):
            found = checkpoint.load_latest(path / sub)
            if found is not None:
                return found[1]["strategy"]
        raise UserError(f"{path} holds no checkpoint (expected source/ or checkpoints/ of a clpeft run)", key=key)
    if not path.is_file():
        raise UserError(f"{path} not found: give a clpeft run directory or one of its checkpoints/exp_*.pt", key=key)
    payload, problem = checkpoint.read(path)
    if problem is not None:
        raise UserError(f"{path}: {problem}", key=key)
    if "strategy" not in payload:
        raise UserError(f"{path} is not a clpeft checkpoint of a run (it holds no strategy state)", key=key)
    return payload["strategy"]
