"""Frozen-backbone features, computed once per sample and reused.

Features are keyed by ``(backbone identity, dataset fingerprint, sample index)``: the
backbone identity digests its settings *and weights*, so a changed backbone never reads stale
features. On disk, each (backbone, dataset) pair is a memory-mapped ``float32`` array plus a
"done" mask; a sample's feature is flushed before its mask bit, so a killed run leaves only
complete features behind and later runs (or a resumed one) reuse them. A file whose header,
shape, dtype or size does not match (truncated, cut inside its header) is rebuilt with a
warning naming the folder, never mapped as it is.
"""

from __future__ import annotations

import time
import warnings
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

from clpeft.backbones.base import Backbone
from clpeft.data import DataView
from clpeft.errors import UserError


class _Damaged(Exception):
    """A cache file that does not hold what this store expects (the message says how)."""


def _mapped(path: Path, shape: tuple[int, ...], dtype) -> np.memmap:
    """``path`` mapped read-write once its header, shape, dtype and size match exactly (numpy would
    zero-extend a short file, whose missing rows ``done.npy`` may still call computed).

    Raises:
        _Damaged: they do not match.
    """
    from numpy.lib import format as npy

    dtype = np.dtype(dtype)
    with open(path, "rb") as f:
        try:
            version = npy.read_magic(f)
            if version not in ((1, 0), (2, 0)):
                raise _Damaged(f"{path.name} has .npy version {version}")
            read = npy.read_array_header_1_0 if version == (1, 0) else npy.read_array_header_2_0
            found = read(f)
        except (ValueError, EOFError, SyntaxError) as exc:
            raise _Damaged(f"{path.name} has an unreadable header: {exc}") from None
        offset = f.tell()
    if found != (shape, False, dtype):
        raise _Damaged(f"{path.name} holds {found[2]} {found[0]}{' (Fortran order)' if found[1] else ''}, expected {dtype} {shape}")
    size, expected = path.stat().st_size, offset + int(np.prod(shape)) * dtype.itemsize
    if size != expected:
        raise _Damaged(f"{path.name} is {size} bytes, expected {expected}")
    return np.memmap(path, dtype=dtype, mode="r+", offset=offset, shape=shape)


class _Store:
    """One (backbone, dataset) pair's features and done mask, in memory or memory-mapped files.

    Files that do not match the expected shape, dtype and size are rebuilt with a warning
    naming the folder; a folder or file that cannot be used at all is a :class:`UserError`.
    """

    def __init__(self, n: int, dim: int, directory: Path | None):
        if directory is None:
            self.values = np.zeros((n, dim), dtype=np.float32)
            self.done = np.zeros(n, dtype=bool)
            return
        fpath, dpath = directory / "features.npy", directory / "done.npy"
        try:
            directory.mkdir(parents=True, exist_ok=True)
            if fpath.exists() and dpath.exists():
                try:
                    self.values = _mapped(fpath, (n, dim), np.float32)
                    self.done = _mapped(dpath, (n,), np.bool_)
                    return
                except _Damaged as exc:
                    warnings.warn(f"feature cache {directory} is damaged ({exc}); rebuilding it", stacklevel=2)
            # the mask first: until the features file is whole, no row is marked computed
            self.done = np.lib.format.open_memmap(dpath, mode="w+", dtype=np.bool_, shape=(n,))
            self.values = np.lib.format.open_memmap(fpath, mode="w+", dtype=np.float32, shape=(n, dim))
        except OSError as exc:
            where = exc.filename or directory
            raise UserError(
                f"cannot use the feature cache at {where} ({exc.strerror or exc}); delete it, point "
                f"CLPEFT_CACHE at a writable folder, or set train.feature_cache: memory"
            ) from None

    def flush(self) -> None:
        for arr in (self.values, self.done):
            if isinstance(arr, np.memmap):
                arr.flush()


class FeatureCache:
    """Compute-once features of a frozen backbone.

    Args:
        backbone: the frozen backbone.
        device: where the backbone runs.
        batch_size: batch size of the feature passes.
        directory: root of the on-disk cache; ``None`` keeps features in memory.
        autocast: a context-manager factory for mixed precision (or None).
    """

    def __init__(self, backbone: Backbone, device: torch.device, batch_size: int = 256, directory: Path | None = None, autocast=None):
        self.backbone = backbone
        self.device = device
        self.batch_size = batch_size
        self.directory = directory
        self.autocast = autocast or nullcontext
        self._identity = backbone.identity()
        self._stores: dict[str, _Store] = {}
        self.computed = 0  # samples passed through the backbone (for tests and reports)
        self.seconds = 0.0  # time spent computing them: the one-off fill, reported apart from training

    def refresh_identity(self) -> None:
        """Re-key to the backbone's current weights (after a method adapted and re-froze it)."""
        self._identity = self.backbone.identity()

    def _store(self, dataset) -> _Store:
        key = f"{self._identity}-{dataset.fingerprint}"
        if key not in self._stores:
            directory = None if self.directory is None else self.directory / "features" / key
            self._stores[key] = _Store(len(dataset), self.backbone.feature_dim, directory)
        return self._stores[key]

    @torch.no_grad()
    def features(self, view: DataView, progress=None) -> torch.Tensor:
        """``(len(view), feature_dim)`` float32 features on the CPU, in view order."""
        out = []
        for dataset, idx in view.parts:
            store = self._store(dataset)
            missing = np.unique(idx.numpy()[~store.done[idx.numpy()]])
            if len(missing):
                self._compute(dataset, store, torch.from_numpy(missing), progress)
            out.append(torch.from_numpy(np.ascontiguousarray(store.values[idx.numpy()])))
        if not out:
            return torch.empty(0, self.backbone.feature_dim)
        return out[0] if len(out) == 1 else torch.cat(out)

    def _compute(self, dataset, store: _Store, indices: torch.Tensor, progress) -> None:
        began = time.perf_counter()  # features reach the CPU below, so no device sync is needed
        was_training = self.backbone.training
        self.backbone.eval()
        single = DataView.of(dataset, indices)
        for start in range(0, len(indices), self.batch_size):
            pos = torch.arange(start, min(start + self.batch_size, len(indices)))
            x, _ = single.load(pos)
            with self.autocast():
                f = self.backbone(x.to(self.device, non_blocking=True) if isinstance(x, torch.Tensor) else x)
            rows = indices[pos].numpy()
            store.values[rows] = f.float().cpu().numpy()
            self.computed += len(rows)
            if progress is not None:
                progress(len(rows))
        store.flush()
        store.done[indices.numpy()] = True
        store.flush()
        self.backbone.train(was_training)
        self.seconds += time.perf_counter() - began
