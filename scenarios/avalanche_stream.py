"""Any Avalanche benchmark as a clpeft stream.

``benchmark`` names a callable by import path (``avalanche.benchmarks.classic:SplitCIFAR100`` or
your own ``mypackage.bench:make``) that returns an Avalanche benchmark with ``train_stream`` and
``test_stream``; ``kwargs`` are passed to it. The stream keeps Avalanche's experiences and class
split; labels are renumbered in the order classes first appear (so heads grow contiguously),
and items are read lazily from Avalanche's datasets. Raw images are what clpeft's backbones
expect (they resize and normalise themselves), so when the callable takes
``train_transform``/``eval_transform`` and ``kwargs`` does not set them, they are set to None.
"""

from __future__ import annotations

import hashlib
import inspect

import numpy as np
import torch

from clpeft.data import DataView
from clpeft.errors import UserError
from clpeft.experience import Experience, Scenario
from clpeft.registry import import_user_module, register_scenario


def _as_tensor(x) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x
    if hasattr(x, "mode"):  # a PIL image
        from torchvision.transforms.functional import pil_to_tensor

        return pil_to_tensor(x)
    return torch.as_tensor(np.asarray(x))


class _AvalancheItems(torch.utils.data.Dataset):
    """One Avalanche dataset, with labels renumbered through ``mapping``."""

    def __init__(self, dataset, mapping: dict[int, int], name: str):
        self.dataset = dataset
        self.name = name
        self.targets = torch.tensor([mapping[int(t)] for t in dataset.targets], dtype=torch.long)

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        return _as_tensor(self.dataset[i][0]), self.targets[i]

    @property
    def fingerprint(self) -> str:
        h = hashlib.sha1(self.name.encode())
        h.update(self.targets.numpy().tobytes())
        h.update(self[0][0].contiguous().numpy().tobytes() if len(self) else b"")
        return h.hexdigest()[:16]


@register_scenario("avalanche")
class AvalancheStream(Scenario):
    """An Avalanche benchmark (by import path) as a clpeft stream, experiences and class split kept.

    Args:
        seed: run seed (passed as ``seed`` when the callable takes one and kwargs does not).
        benchmark: ``module:callable`` returning an Avalanche benchmark.
        kwargs: keyword arguments for the callable, e.g. ``{n_experiences: 10}``.
        kind: the scenario kind strategies check (``class_incremental`` or ``domain_incremental``).
    """

    def __init__(self, seed: int, benchmark: str, kwargs: dict = {}, kind: str = "class_incremental"):
        self.seed = seed
        self.benchmark = benchmark
        self.kwargs = dict(kwargs)
        self.kind = kind
        self.input_shape = ()
        self.class_names = []

    def _make(self):
        module, _, attr = self.benchmark.rpartition(":")
        if not module:
            raise UserError(f"expected 'module:callable', got '{self.benchmark}'", key="scenario.benchmark")
        try:
            factory = getattr(import_user_module(module, "scenario.benchmark"), attr)
        except AttributeError as exc:
            raise UserError(f"cannot load '{self.benchmark}' ({exc})", key="scenario.benchmark") from None
        params = inspect.signature(factory).parameters
        kwargs = dict(self.kwargs)
        for key in ("train_transform", "eval_transform"):
            if key in params:
                kwargs.setdefault(key, None)
        if "seed" in params:
            kwargs.setdefault("seed", self.seed)
        try:
            bm = factory(**kwargs)
        except TypeError as exc:
            raise UserError(f"{self.benchmark}: {exc}", key="scenario.kwargs") from None
        if not (hasattr(bm, "train_stream") and hasattr(bm, "test_stream")):
            raise UserError(
                f"'{self.benchmark}' returned {type(bm).__name__}, not an Avalanche benchmark "
                "(an object with train_stream and test_stream)",
                key="scenario.benchmark",
            )
        return bm

    def experiences(self) -> list[Experience]:
        bm = self._make()
        train, test = list(bm.train_stream), list(bm.test_stream)
        if len(train) != len(test):
            raise UserError(f"{self.benchmark} has {len(train)} training but {len(test)} test experiences", key="scenario.benchmark")
        order: list[int] = []
        for e in train:
            order += [int(c) for c in sorted(e.classes_in_this_experience) if int(c) not in order]
        mapping = {c: i for i, c in enumerate(order)}
        self.class_names = [str(c) for c in order]
        stream, seen = [], []
        for i, (tr, te) in enumerate(zip(train, test)):
            new = sorted({mapping[int(c)] for c in tr.classes_in_this_experience})
            seen = sorted(set(seen) | set(new))
            tr_items = _AvalancheItems(tr.dataset, mapping, f"{self.benchmark}/train/{i}")
            te_items = _AvalancheItems(te.dataset, mapping, f"{self.benchmark}/test/{i}")
            stream.append(Experience(i, DataView.of(tr_items), DataView.of(te_items), new, seen))
        self.input_shape = tuple(stream[0].train.load([0])[0].shape[1:])
        return self.link(stream)
