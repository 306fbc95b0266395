"""Test-time adaptation streams: a source model, then unlabeled test data from shifting domains.

The protocols of Wang et al., "Tent: Fully Test-Time Adaptation by Entropy Minimization", ICLR
2021 (https://arxiv.org/abs/2006.10726; one corruption, model reset), Wang et al., "Continual
Test-Time Domain Adaptation", CVPR 2022 (https://arxiv.org/abs/2203.13591; CoTTA: the 15
corruptions one after another, no reset) and Döbler et al., "Robust Mean Teacher for Continual
and Gradual Test-Time Adaptation", CVPR 2023 (https://arxiv.org/abs/2211.13081; gradual
severities, mixed domains).

The stream, as the engine runs it (see :mod:`clpeft.loops.test_time`):

* experience 0 is the **source** phase: the strategy trains on :attr:`source` (the clean
  training split) with the ordinary loop, or its state is loaded from ``source_checkpoint``;
* experiences ``1..D`` are the **domains**: ``train`` is None, ``test`` holds the corrupted test
  data (labels for the engine's scoring only; strategies receive unlabeled batches),
  ``domain`` names it (``"fog@5"``).

Modes: ``continual`` (each corruption at ``severity``, in the given order), ``gradual`` (each
corruption at severities 1, 2, 3, 4, 5, 4, 3, 2, 1: RMT's gradual setting), ``mixed`` (every
corruption's samples shuffled together, cut into experiences of ``chunk_size``, domain
``"mixed"``). Every domain holds the same test images, as CIFAR-10-C does. ``label_shift:
dirichlet`` orders each domain's samples (or, in ``mixed`` mode, the mixture) so that labels are
temporally correlated, the non-i.i.d. stream of NOTE (Gong et al. 2022) as Döbler et al.'s
benchmark samples it (:func:`clpeft.scenarios.label_shift.dirichlet_order`, concentration
``dirichlet_concentration``).

Corrupted data comes from :mod:`clpeft.scenarios.corruptions` applied on the fly to any image
dataset (all 15 corruptions, equal to the published generators with the constants of CIFAR-10-C,
Tiny-ImageNet-C or ImageNet-C, ``corruption_constants``), or from the published files for users
who have them (``corrupted_root``):

* ``cifar_c`` (CIFAR-10-C / CIFAR-100-C): ``<corrupted_root>/<corruption>.npy`` holding
  ``(50000, 32, 32, 3)`` ``uint8`` images, severities 1..5 in five equal blocks (10,000 each),
  and ``labels.npy``; read through a memory map.
* ``imagenet_c``: ``<corrupted_root>/<corruption>/<severity>/<wnid>/*.JPEG``; classes are the
  sorted ``wnid`` folders (torchvision's ImageNet class order); decoded lazily (224 pixels).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import torch
from pydantic import Field

from clpeft.data import DataView
from clpeft.errors import UserError
from clpeft.experience import Experience, Scenario
from clpeft.registry import close_matches, register_scenario
from clpeft.scenarios import data_checks, datasets
from clpeft.scenarios.array_datasets import load_npy
from clpeft.scenarios.corruption_constants import ConstantChoice
from clpeft.scenarios.corruptions import CORRUPTIONS, IMAGENET_C, CorruptedDataset, gather
from clpeft.scenarios.data_source import DataSource, Subsample
from clpeft.scenarios.label_shift import dirichlet_order
from clpeft.schema import flat_options, flat_params

GRADUAL_SEVERITIES = [1, 2, 3, 4, 5, 4, 3, 2, 1]


class _NpyImages(torch.utils.data.Dataset):
    """Rows ``start .. start + count`` of a ``(N, H, W, C)`` ``uint8`` ``.npy`` file, memory-mapped."""

    def __init__(self, path: Path, start: int, count: int, targets: torch.Tensor, name: str):
        self.path, self.start, self.count = path, start, count
        self.targets = targets
        self.name = name
        self._array = None

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, i: int):
        x, y = self.gather(torch.tensor([i]))
        return x[0], y[0]

    def gather(self, indices: torch.Tensor):
        if self._array is None:
            self._array = np.load(self.path, mmap_mode="r")
        rows = np.asarray(self._array[self.start + indices.numpy()])
        return torch.from_numpy(rows).permute(0, 3, 1, 2).contiguous(), self.targets.index_select(0, indices)

    @property
    def fingerprint(self) -> str:
        st = os.stat(self.path)
        key = f"{self.path}|{st.st_size}|{st.st_mtime_ns}|{self.start}|{self.count}"
        return hashlib.sha1(key.encode()).hexdigest()[:16]


class _DomainMixture(torch.utils.data.Dataset):
    """Several ``(dataset, indices)`` parts as one dataset; :meth:`gather` reads each part once
    per batch, so a shuffled mixture of corrupted domains still corrupts in vectorised batches."""

    def __init__(self, parts: list[tuple[Any, torch.Tensor]]):
        self.parts = parts
        self.offsets = torch.tensor([0, *np.cumsum([len(idx) for _, idx in parts])])
        self.targets = torch.cat([ds.targets[idx] for ds, idx in parts])
        self.name = "mixed(" + ",".join(ds.name for ds, _ in parts) + ")"

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, i: int):
        x, y = self.gather(torch.tensor([i]))
        return x[0], y[0]

    def gather(self, indices: torch.Tensor):
        which = torch.searchsorted(self.offsets, indices, right=True) - 1
        out = None
        for k in which.unique().tolist():
            sel = which == k
            ds, idx = self.parts[k]
            local = idx[indices[sel] - self.offsets[k]]
            x = gather(ds, local)[0]
            if out is None:
                out = torch.empty((len(indices), *x.shape[1:]), dtype=x.dtype)
            out[sel] = x
        return out, self.targets.index_select(0, indices)

    @property
    def fingerprint(self) -> str:
        h = hashlib.sha1()
        for ds, idx in self.parts:
            h.update(ds.fingerprint.encode())
            h.update(idx.numpy().tobytes())
        return h.hexdigest()[:16]


@register_scenario("test_time_adaptation")
class TestTimeAdaptation(Scenario):
    """Test-time adaptation: a source model, then unlabeled corrupted domains (Wang et al. 2021; CoTTA 2022; RMT 2023).

    Args:
        seed: run seed (subsampling, the mixed order and the corruption noise draw from it).
        dataset: the clean data: its training split trains the source model, its test split is
            corrupted on the fly (not needed with both ``corrupted_root`` and ``source_checkpoint``).
        corruptions: the domain sequence; default: the 15 ImageNet-C corruptions in the order of
            the continual TTA benchmarks (CoTTA; ``CORRUPTION.TYPE`` of mariodoebler/test-time-adaptation).
        severity: 1..5 (``continual`` and ``mixed``; ``gradual`` runs 1..5..1).
        mode: ``continual``, ``gradual`` or ``mixed``.
        reset_each_domain: restore the source model at the start of every domain (Tent's
            protocol) instead of adapting continually (CoTTA's).
        source_checkpoint: a clpeft checkpoint file or run directory whose strategy state is the
            source model (skips source training).
        chunk_size: samples per experience in ``mixed`` mode.
        train_per_class: keep at most this many source training samples per class.
        test_per_class: keep at most this many test samples per class (the same in every domain).
        corrupted_root: read corrupted images from the published files here instead of
            corrupting on the fly.
        corrupted_layout: ``cifar_c`` (CIFAR-10-C/100-C ``.npy``) or ``imagenet_c`` (folders).
        corruption_constants: whose constants corrupt on the fly: ``cifar`` (CIFAR-10-C's
            generator), ``tinyimagenet`` (Tiny-ImageNet-C's), ``imagenet`` (ImageNet-C's), or
            ``auto``: by the longer image side, CIFAR-10-C's up to 45 px, Tiny-ImageNet-C's from 46
            to 119 px (e.g. 96, 112), ImageNet-C's from 120 px (the nearest native size, 32, 64 or
            224, on a log scale).
        root: where ``dataset`` lives (and downloads to).
        download: let torchvision download ``dataset`` (needs internet).
        dataset_options: ``dataset``'s own settings, as in ``class_incremental``.
        label_shift: ``none`` (each domain in the dataset's order after subsampling; ``mixed``: a
            random permutation) or ``dirichlet`` (temporally correlated labels, class-imbalanced
            at any moment: NOTE's non-i.i.d. stream, the benchmark's ``correlated`` settings).
        dirichlet_concentration: ``delta`` of the Dirichlet ordering; small values give long runs
            of one class, large ones approach an i.i.d. order.
    """

    kind = "test_time_adaptation"

    @flat_options
    def __init__(
        self,
        seed: int,
        dataset: str | None = None,
        corruptions: list[str] | None = None,
        severity: Annotated[int, Field(ge=1, le=5)] = 5,
        mode: Literal["continual", "gradual", "mixed"] = "continual",
        reset_each_domain: bool = False,
        source_checkpoint: str | None = None,
        chunk_size: Annotated[int, Field(ge=1)] = 1000,
        subsample: Subsample = Subsample(),
        corrupted_root: str | None = None,
        corrupted_layout: Literal["cifar_c", "imagenet_c"] = "cifar_c",
        corruption_constants: ConstantChoice = "auto",
        data_source: DataSource = DataSource(),
        label_shift: Literal["none", "dirichlet"] = "none",
        dirichlet_concentration: Annotated[float, Field(gt=0)] = 0.1,
    ):
        self.check_config(flat_params(locals()))
        self.seed = seed
        self.dataset = dataset
        self.corruptions = corruptions or list(IMAGENET_C)
        self.severity = severity
        self.mode = mode
        self.reset_each_domain = reset_each_domain
        self.source_checkpoint = source_checkpoint
        self.chunk_size = chunk_size
        self.subsample = subsample
        self.corrupted_root = corrupted_root
        self.corrupted_layout = corrupted_layout
        self.corruption_constants = corruption_constants
        self.data_source = data_source
        self.label_shift = label_shift
        self.dirichlet_concentration = dirichlet_concentration
        self.source: DataView | None = None
        self.input_shape = ()
        self.class_names = []

    @classmethod
    def check_config(cls, p: dict) -> None:
        files = p.get("corrupted_root") is not None
        known = set(CORRUPTIONS)
        for i, name in enumerate(p.get("corruptions") or []):
            if name not in known:
                raise UserError(
                    f"unknown corruption '{name}'{close_matches(name, known)}; known: {', '.join(sorted(known))}",
                    key=f"scenario.corruptions[{i}]",
                )
        if p.get("corruptions") == []:
            raise UserError("expected at least one corruption", key="scenario.corruptions")
        if p.get("dataset") is None:
            if not (files and p.get("source_checkpoint")):
                raise UserError(
                    "name the clean dataset (its training split trains the source model, its test split is "
                    "corrupted), or give both corrupted_root and source_checkpoint",
                    key="scenario.dataset",
                )
        else:
            datasets.check_options(p["dataset"], p.get("dataset_options"))

    # ------------------------------------------------------------------ the stream

    def experiences(self) -> list[Experience]:
        train = test = None
        if self.dataset is not None:
            train, test = self.data_source.load(self.dataset)
            self.class_names = list(train.class_names or [str(c) for c in range(int(train.targets.max()) + 1)])
        rng = np.random.default_rng(self.seed)
        if train is not None:  # also with a source_checkpoint: EATA's Fisher needs source-like data
            self.source = DataView.of(train, self.subsample.train(train.targets, rng))
        if self.corrupted_root is None:
            domains = self._on_the_fly(test, rng)
        else:
            domains = self._from_files(rng)
        if self.mode == "mixed":
            domains = self._mixed(domains, rng)
        elif self.label_shift == "dirichlet":
            domains = [(name, self._correlated(view, rng)) for name, view in domains]
        first = domains[0][1]
        self.input_shape = tuple(first.load([0])[0].shape[1:])
        seen = list(range(len(self.class_names)))
        return self.link(
            [
                Experience(index=i + 1, train=None, test=view, classes_in_this_experience=[], classes_seen_so_far=seen, domain=name)
                for i, (name, view) in enumerate(domains)
            ]
        )

    def _schedule(self) -> list[tuple[str, int]]:
        severities = GRADUAL_SEVERITIES if self.mode == "gradual" else [self.severity]
        return [(c, s) for c in self.corruptions for s in severities]

    def _on_the_fly(self, test, rng) -> list[tuple[str, DataView]]:
        sample = test[0][0]
        if not (isinstance(sample, torch.Tensor) and sample.dtype == torch.uint8 and sample.dim() in (2, 3)):
            raise UserError(f"'{self.dataset}' is not a dataset of uint8 images; corruptions apply to images only", key="scenario.dataset")
        keep = torch.as_tensor(self.subsample.test(test.targets, rng))
        return [
            (f"{c}@{s}", DataView.of(CorruptedDataset(test, c, s, self.seed, self.corruption_constants), keep)) for c, s in self._schedule()
        ]

    def _from_files(self, rng) -> list[tuple[str, DataView]]:
        root = Path(self.corrupted_root).expanduser()
        read = self._cifar_c if self.corrupted_layout == "cifar_c" else self._imagenet_c
        schedule = self._schedule()
        data = {key: read(root, *key) for key in dict.fromkeys(schedule)}
        first = data[schedule[0]]
        if self.class_names and int(first.targets.max()) >= len(self.class_names):
            raise UserError(
                f"{root} has labels up to {int(first.targets.max())}, but '{self.dataset}' has {len(self.class_names)} classes",
                key="scenario.corrupted_root",
            )
        if not self.class_names:
            self.class_names = getattr(first, "class_names", None) or [str(c) for c in range(int(first.targets.max()) + 1)]
        keep = torch.as_tensor(self.subsample.test(first.targets, rng))
        return [(f"{c}@{s}", DataView.of(data[(c, s)], keep)) for c, s in schedule]

    @staticmethod
    def _cifar_c(root: Path, corruption: str, severity: int) -> _NpyImages:
        path, labels = root / f"{corruption}.npy", root / "labels.npy"
        for p in (path, labels):
            if not p.is_file():
                raise UserError(
                    f"{p} not found: the CIFAR-10-C layout is <root>/<corruption>.npy and <root>/labels.npy "
                    f"(https://zenodo.org/record/2535967)",
                    key="scenario.corrupted_root",
                )
        key = "scenario.corrupted_root"
        all_labels = data_checks.label_values(load_npy(labels, key=key), str(labels), key)
        if all_labels.dtype.kind != "i" or not len(all_labels) or (all_labels < 0).any():
            raise UserError(f"{labels}: expected one class id (0, 1, ...) per image", key=key)
        images = load_npy(path, mmap_mode="r", key=key)  # header only; a truncated file is refused here
        if images.dtype != np.uint8 or images.ndim != 4 or len(images) != len(all_labels):
            raise UserError(
                f"{path}: expected uint8 images (N, H, W, C) with N = {len(all_labels)}, the length of "
                f"{labels}; got {images.dtype} {images.shape}",
                key=key,
            )
        block = len(all_labels) // 5  # 10,000: the CIFAR test set once per severity
        start = (severity - 1) * block
        targets = torch.from_numpy(all_labels[start : start + block].astype(np.int64))
        return _NpyImages(path, start, block, targets, f"cifar_c/{corruption}@{severity}")

    @staticmethod
    def _imagenet_c(root: Path, corruption: str, severity: int):
        from clpeft.scenarios.folder_datasets import IMAGE_SUFFIXES, image_dataset

        folder = root / corruption / str(severity)
        if not folder.is_dir():
            raise UserError(
                f"{folder} not found: the ImageNet-C layout is <root>/<corruption>/<severity>/<wnid>/*.JPEG "
                f"(https://zenodo.org/record/2235448)",
                key="scenario.corrupted_root",
            )
        classes = sorted(d.name for d in folder.iterdir() if d.is_dir())
        paths, targets = [], []
        for k, wnid in enumerate(classes):
            files = sorted(f for f in (folder / wnid).iterdir() if f.suffix.lower() in IMAGE_SUFFIXES)
            paths += [str(f) for f in files]
            targets += [k] * len(files)
        return image_dataset(paths, targets, f"imagenet_c/{corruption}@{severity}", classes, 224, "RGB", "lazy")

    def _correlated(self, view: DataView, rng) -> DataView:
        """``view`` in a Dirichlet order of its labels."""
        return view.take(dirichlet_order(view.targets.numpy(), self.dirichlet_concentration, _legacy(rng)))

    def _mixed(self, domains: list[tuple[str, DataView]], rng) -> list[tuple[str, DataView]]:
        mixture = _DomainMixture([view.parts[0] for _, view in domains])
        if self.label_shift == "dirichlet":
            order = torch.as_tensor(dirichlet_order(mixture.targets.numpy(), self.dirichlet_concentration, _legacy(rng)))
        else:
            order = torch.as_tensor(rng.permutation(len(mixture)))
        return [("mixed", DataView.of(mixture, chunk)) for chunk in order.split(self.chunk_size)]


def _legacy(rng: np.random.Generator) -> np.random.RandomState:
    """A legacy numpy generator seeded from ``rng`` (the Dirichlet ordering draws as the reference does)."""
    return np.random.RandomState(int(rng.integers(2**32)))
