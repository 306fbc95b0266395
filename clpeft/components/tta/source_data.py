"""Labelled source data inside a test-time stream.

Some TTA methods keep using the data the source model was trained on: EATA weighs its
parameters on it (Niu et al., ICML 2022, eq. 9), RMT computes class prototypes on it, warms its
mean teacher up on it and replays labelled batches of it at every step (Döbler et al., CVPR 2023,
sections 3.2-3.4). :func:`source_training_data` finds that data in the stream;
:class:`SourceBatches` draws from it endlessly, seeded and resumable.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from clpeft.data import Batch, DataView
from clpeft.errors import UserError
from clpeft.experience import Experience


def source_training_data(exp: Experience, strategy: str, without: str) -> DataView:
    """The training data of the latest experience before ``exp`` that had any (the source model's).

    ``without`` names the setting that turns the method's use of source data off; it goes into
    the error raised when the run has none (its source model was loaded, not trained here).
    """
    source = exp.train if exp.train is not None else next((e.train for e in reversed(exp.past) if e.train is not None), None)
    if source is None:
        raise UserError(
            f"{strategy} uses the source training data, and this run has none (the source model was loaded, not trained); set {without}",
            key="strategy",
        )
    return source


class SourceBatches(nn.Module):
    """An endless stream of shuffled source batches whose position is part of the ``state_dict``.

    Args:
        batch_size: samples per batch (the last batch of an epoch may be smaller); ``None`` until
            the owner sets ``batch_size`` (RMT: to the test batch size, once the engine is attached).

    Epoch ``e`` visits the data in the order ``randperm(n)`` drawn from a generator seeded with
    ``seed + e``; ``seed`` is drawn from torch's global generator when the stream starts, so a run
    is reproducible under the engine's seeding and a restored stream continues exactly where the
    saved one stopped.
    """

    def __init__(self, batch_size: int | None = None):
        super().__init__()
        self.batch_size = batch_size
        self.register_buffer("seed", torch.zeros((), dtype=torch.long))
        self.register_buffer("drawn", torch.zeros((), dtype=torch.long))
        self._data: DataView | None = None
        self._order: tuple[tuple[int, int], torch.Tensor] | None = None

    def start(self, data: DataView) -> None:
        """Begin a new stream over ``data`` (a fresh seed, position 0)."""
        self.seed.fill_(int(torch.randint(0, 2**31 - 1, ())))
        self.drawn.zero_()
        self.attach(data)

    def attach(self, data: DataView) -> None:
        """Draw from ``data`` from the current position on (after a restore)."""
        self._data = data
        self._order = None

    def next(self, owner) -> Batch:
        """The next batch, loaded as ``owner.batches`` loads data (features or inputs, on its device)."""
        if self._data is None or self.batch_size is None:
            raise RuntimeError("SourceBatches.next before start/attach and a batch size")
        per_epoch = math.ceil(len(self._data) / self.batch_size)
        epoch, index = divmod(int(self.drawn), per_epoch)
        key = (int(self.seed), epoch)
        if self._order is None or self._order[0] != key:
            generator = torch.Generator().manual_seed(key[0] + epoch)
            self._order = (key, torch.randperm(len(self._data), generator=generator))
        positions = self._order[1][index * self.batch_size : (index + 1) * self.batch_size]
        self.drawn += 1
        return next(iter(owner.batches(self._data.take(positions), self.batch_size)))
