"""Mini-batches for the engine and the strategies: cached features or raw inputs, on the device."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import nullcontext

import torch

from clpeft.data import Batch, DataView
from clpeft.distributed import World
from clpeft.errors import UserError
from clpeft.feature_cache import FeatureCache


class DataAccess:
    """Batches of a view on the device: cached features or raw inputs.

    Args:
        device: where batches go.
        cache: the feature cache (``None`` when features are not cached).
        backbone: used for features when there is no cache.
        batch_size: default batch size.
        num_workers: DataLoader workers, used for datasets that decode files per item.
        autocast: mixed-precision context factory.
        cache_factory: builds the feature cache the first time features are needed
            (:meth:`refresh_cache`); ``None`` when caching is off.
        world: this process's rank in a data-parallel run (:mod:`clpeft.distributed`).
    """

    def __init__(
        self,
        device,
        cache: FeatureCache | None,
        backbone,
        batch_size: int,
        num_workers: int = 0,
        autocast=None,
        cache_factory: Callable[[], FeatureCache] | None = None,
        world: World | None = None,
    ):
        self.device = device
        self.world = world or World()
        self.cache = cache
        self._cache_factory = cache_factory
        self.backbone = backbone
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.autocast = autocast or nullcontext

    def refresh_cache(self, needed: bool, rekey: bool = True) -> None:
        """Make the cache match the backbone (called by :meth:`Strategy.refresh_input_mode`).

        A method may train its backbone first and freeze it later (first-session adaptation in
        FSA, RanPAC, APER): the cache is then built when features are first needed, and an
        existing cache is re-keyed to the backbone's current weights, so adapted weights never
        read features computed before the adaptation. ``rekey=False`` only builds a missing cache
        (for evaluations, where the weights cannot have changed since the experience began).
        """
        if not needed or self._cache_factory is None:
            return
        if self.cache is None:
            self.cache = self._cache_factory()
        elif rekey:
            self.cache.refresh_identity()

    def batches(
        self,
        view: DataView,
        batch_size: int | None = None,
        shuffle: bool = False,
        uses_features: bool = False,
        with_query: bool = False,
        generator: torch.Generator | None = None,
        shard: bool = False,
        augment: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> Iterator[Batch]:
        """Mini-batches of ``view``: cached features (``uses_features``), or raw inputs, plus the
        cached features as ``batch.features`` when ``with_query``.

        ``shard=True`` in a data-parallel run: every rank draws the same order and batches of
        ``batch_size`` (the global batch) and keeps positions ``rank, rank + world, ...`` of each;
        a rank's share may be empty. Features are computed only for this rank's share.

        ``augment`` (training, :mod:`clpeft.augment`) transforms the raw inputs first; features and
        queries are then those of the augmented inputs, computed here, never read from the cache.
        """
        bs = batch_size or self.batch_size
        order = torch.randperm(len(view), generator=generator) if shuffle else torch.arange(len(view))
        chunks = order.split(bs)
        if shard:
            chunks = [self.world.shard(c) for c in chunks]
        if augment is not None:
            yield from self._augmented(view, chunks, augment, uses_features, with_query)
            return
        cached = self._cached(view, chunks) if self.cache and (uses_features or with_query) else None
        if uses_features and cached is not None:
            targets = view.targets.to(self.device, non_blocking=True)
            for pos in chunks:
                on_device = pos.to(self.device)
                yield Batch(cached[on_device], targets[on_device], index=pos)
            return
        for pos, (x, y) in zip(chunks, self._raw(view, chunks)):
            x = _to_device(x, self.device)
            y = y.to(self.device, non_blocking=True)
            if uses_features:
                with torch.no_grad(), self.autocast():
                    x = self.backbone(x).float()
            yield Batch(x, y, cached[pos.to(self.device)] if cached is not None else None, index=pos)

    def _augmented(self, view: DataView, chunks, augment, uses_features: bool, with_query: bool) -> Iterator[Batch]:
        for pos, (x, y) in zip(chunks, self._raw(view, chunks)):
            x = augment(_to_device(x, self.device))
            features = None
            if uses_features or with_query:
                with torch.no_grad(), self.autocast():
                    features = self.backbone(x).float()
            yield Batch(features if uses_features else x, y.to(self.device, non_blocking=True), features if with_query else None, index=pos)

    def _cached(self, view: DataView, chunks: list[torch.Tensor]) -> torch.Tensor:
        """Cached features of ``view`` on the device; rows outside ``chunks`` stay zero when the
        chunks hold only a rank's share (so other ranks' samples are never computed here)."""
        if not self.world.active:
            return self.cache.features(view).to(self.device)
        mine = torch.cat(chunks) if chunks else torch.empty(0, dtype=torch.long)
        cached = torch.zeros(len(view), self.backbone.feature_dim)
        cached[mine] = self.cache.features(view.take(mine))
        return cached.to(self.device)

    def inputs(self, view: DataView, batch_size: int | None = None, uses_features: bool = False) -> Iterator[torch.Tensor]:
        """Unlabeled mini-batches of ``view`` in order (test-time adaptation): raw inputs on the
        device, or the backbone's features of them (``uses_features``, computed, not cached).
        The labels a dataset returns with its inputs are dropped here."""
        chunks = torch.arange(len(view)).split(batch_size or self.batch_size)
        for x, _ in self._raw(view, chunks):
            x = _to_device(x, self.device)
            if uses_features:
                with torch.no_grad(), self.autocast():
                    x = self.backbone(x).float()
            yield x

    def _raw(self, view: DataView, chunks):
        if self.num_workers == 0 or all(hasattr(ds, "gather") for ds, _ in view.parts):
            for pos in chunks:
                yield view.load(pos)
            return
        loader = torch.utils.data.DataLoader(
            _ViewItems(view),
            batch_sampler=[c.tolist() for c in chunks],
            num_workers=self.num_workers,
            pin_memory=self.device.type == "cuda",
        )
        try:
            yield from loader
        except UserError as exc:
            raise _unwrapped(exc) from None


def _unwrapped(exc: UserError) -> UserError:
    """The one-line error a DataLoader worker raised: torch re-raises it in this process with the
    worker's traceback as its message, which ends ``<module>.<class>: <original message>``."""
    marker = f"{type(exc).__module__}.{type(exc).__qualname__}: "
    text = str(exc)
    return type(exc)(text.rpartition(marker)[2].strip()) if marker in text else exc


def _to_device(x, device: torch.device):
    """Tensors move to the device; other inputs (lists of strings for text backbones) stay as they are."""
    return x.to(device, non_blocking=True) if isinstance(x, torch.Tensor) else x


class _ViewItems(torch.utils.data.Dataset):
    def __init__(self, view: DataView):
        self.view = view

    def __len__(self):
        return len(self.view)

    def __getitem__(self, i):
        x, y = self.view.take([i]).load()
        return x[0], y[0]
