"""Where and how a merge writes: never onto or into its inputs, and all or nothing.

:func:`check_outputs` runs before anything is written. ``os.replace`` onto an input would swap
a fine-tuned checkpoint for the merged file, whatever the spelling of the path (``./``, a
symlink, a hard link), and a file written into an input directory becomes part of that
checkpoint (a run directory resolves to the file, a directory of shards reads it as one more
shard), so both are refused, as are outputs that are directories, devices or pipes (a rename
onto ``/dev/null`` replaces the device node) or the same file twice.

:func:`atomic_output` writes a hidden temporary file next to the output and renames it into
place only when the whole block succeeded. It is removed on any exception, on Ctrl-C, and on
SIGTERM (a scheduler preempting the job), which raises ``SystemExit(143)`` while the file is
open instead of ending the process on the spot. A merge killed outright (SIGKILL, a crash) leaves
its temporary file behind; the next write of the same output removes it. Each temporary file
is ``flock``-ed while it is written, so only files that no live process holds are removed.
Errors of the file system (a full disk, a read-only one, a name too long) are one line naming
the output.
"""

from __future__ import annotations

import fcntl
import os
import signal
import tempfile
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path

from clpeft.errors import UserError

__all__ = ["OutputFile", "atomic_output", "check_outputs"]

_NAME_CHARS = 40  # of the output's name in its temporary file's, which must fit the file system too
_RANDOM_CHARS = 8  # tempfile's random part
_SUFFIX = ".tmp"


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist
        return False


def check_outputs(outputs: Mapping[str, Path], inputs: Sequence[Path]) -> None:
    """Refuse output paths that are directories, inputs, inside input directories or repeated.

    Args:
        outputs: config key (``out``, ``report``) -> the file a merge will write.
        inputs: everything the merge reads: checkpoints as given (files, shard indexes,
            directories) and the files they resolve to.

    Raises:
        UserError: naming the output, under its key.
    """
    written: dict[str, Path] = {}
    for key, path in outputs.items():
        if path.is_dir():
            raise UserError(f"{path} is a directory; give a file name such as {path / 'merged.safetensors'}", key=key)
        if path.exists() and not path.is_file():  # renaming onto /dev/null would replace the device itself
            raise UserError(f"{path} is not a regular file (a device, pipe or socket): give a file path", key=key)
        target = path.parent.resolve() / path.name  # where os.replace puts it
        for source in inputs:
            if _same_file(path, source):
                raise UserError(
                    f"{path} is the same file as the input {source}; writing it would destroy that input: choose another path",
                    key=key,
                )
            if source.is_dir() and target.is_relative_to(source.resolve()):
                raise UserError(
                    f"{path} is inside the input directory {source}, where it would become part of that checkpoint: write it elsewhere",
                    key=key,
                )
        for other_key, other in written.items():
            if target == other or _same_file(path, other):
                raise UserError(
                    f"{path} is the same file as {other_key} ({outputs[other_key]}); each output needs its own path",
                    key=key,
                )
        written[key] = target


def _temp_prefix(path: Path) -> str:
    return f".{path.name[:_NAME_CHARS]}.partial-"


def _write_error(path: Path, exc: OSError) -> UserError:
    return UserError(f"cannot write {path}: {exc.strerror or exc}")


def _remove_stale(path: Path) -> None:
    """Remove temporary files of ``path`` that no live writer holds (left by a killed merge)."""
    prefix = _temp_prefix(path)
    with os.scandir(path.parent) as entries:
        stale = [
            e.path
            for e in entries
            if e.name.startswith(prefix)
            and e.name.endswith(_SUFFIX)
            and len(e.name) == len(prefix) + _RANDOM_CHARS + len(_SUFFIX)
            and e.is_file(follow_symlinks=False)
        ]
    for name in stale:
        try:
            fd = os.open(name, os.O_RDWR | os.O_NOFOLLOW)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.unlink(name)
        except OSError:  # held by a live writer (or already gone)
            pass
        finally:
            os.close(fd)


def _exit(signum: int, frame: object) -> None:
    raise SystemExit(128 + signum)


@contextmanager
def _sigterm_raises() -> Iterator[None]:
    """SIGTERM raises ``SystemExit(143)`` during the block, so ``finally`` clauses run; only in
    the main thread (where Python runs handlers) and where SIGTERM has its default action."""
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL:
        yield
        return
    signal.signal(signal.SIGTERM, _exit)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


class OutputFile:
    """The temporary file being written; :meth:`write` writes everything it is given, unbuffered."""

    def __init__(self, fd: int, path: Path):
        self._fd = fd
        self._path = path

    def write(self, data: bytes | memoryview) -> int:
        view = memoryview(data).cast("B")
        while view:
            try:
                view = view[os.write(self._fd, view) :]
            except OSError as exc:
                raise _write_error(self._path, exc) from None
        return len(data)


def _umask() -> int:
    """The process's umask (reading it means setting it; it is set straight back)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[OutputFile]:
    """A temporary file next to ``path``, renamed to ``path`` only if the block succeeds.

    On any exception, Ctrl-C or SIGTERM the temporary file is removed and ``path`` is left
    untouched, so a failed merge never leaves a partial output behind. (Atomic against errors;
    no fsync is issued.)

    Raises:
        UserError: the file system refused (a full or read-only disk, a name too long).
    """
    path = Path(path)
    with _sigterm_raises():
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            _remove_stale(path)
            fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path), suffix=_SUFFIX, dir=path.parent)
            os.fchmod(fd, 0o666 & ~_umask())  # mkstemp's 0600 would make the output private to its writer
        except OSError as exc:
            raise _write_error(path, exc) from None
        with suppress(OSError):  # best effort: some network file systems have no locks
            fcntl.flock(fd, fcntl.LOCK_EX)  # marks the file live for _remove_stale
        try:
            yield OutputFile(fd, path)
        except BaseException:  # the caller's error, Ctrl-C, SIGTERM: passed on unchanged
            with suppress(OSError):
                os.close(fd)
            Path(tmp).unlink(missing_ok=True)
            raise
        try:
            os.close(fd)  # a network file system may report a full disk only here
            os.replace(tmp, path)
        except BaseException as exc:
            Path(tmp).unlink(missing_ok=True)
            if isinstance(exc, OSError):
                raise _write_error(path, exc) from None
            raise
