"""Domain-incremental streams: one label space, a new input domain per experience.

The protocol of van de Ven & Tolias, "Three scenarios for continual learning", 2019
(https://arxiv.org/abs/1904.07734; Permuted/Rotated MNIST) and of the pretrained-model domain
benchmarks (CORe50, DomainNet: Wang et al., "S-Prompts Learning with Pre-trained Transformers",
NeurIPS 2022, https://arxiv.org/abs/2207.12819). Each entry of ``domains`` is one experience:

* ``{dataset: ..., root: ...}``: a dataset of its own (e.g. one DomainNet domain as an
  ``image_folder``); every domain must have the same classes;
* ``{rotation: 45}``: the scenario's ``dataset`` rotated by that many degrees (bilinear);
* ``{permutation: true}``: its pixels shuffled by a fixed permutation (seeded by the run seed
  and the domain's position);
* ``{corruption: fog, severity: 3}``: a corruption of :mod:`clpeft.scenarios.corruptions`
  (with the constants ``corruption_constants`` names);
* ``{}``: the scenario's ``dataset`` unchanged.

Transforms are applied on the fly, per batch. Avalanche's domain benchmarks (CORe50 NI,
RotatedMNIST...) run through the ``avalanche`` scenario with ``kind: domain_incremental``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, model_validator

from clpeft.data import ArrayDataset, DataView
from clpeft.errors import UserError
from clpeft.experience import Experience, Scenario
from clpeft.registry import close_matches, register_scenario
from clpeft.scenarios import datasets
from clpeft.scenarios.corruption_constants import ConstantChoice
from clpeft.scenarios.corruptions import CORRUPTIONS, CorruptedDataset, TransformedDataset
from clpeft.scenarios.data_source import DataSource, Subsample
from clpeft.scenarios.online import check_online, online_protocol
from clpeft.schema import flat_options, flat_params


class Domain(BaseModel):
    """One domain: a dataset of its own, or a transform of the scenario's dataset (at most one)."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(None, description="name shown in logs (default: derived from the domain)")
    dataset: str | None = Field(None, description="a dataset of its own")
    root: str | None = Field(None, description="where that dataset lives (default: scenario.root)")
    dataset_options: dict[str, Any] | None = Field(None, description="that dataset's options")
    rotation: float | None = Field(None, description="rotate the scenario's dataset by this many degrees")
    permutation: bool = Field(False, description="shuffle its pixels with a fixed permutation")
    corruption: str | None = Field(None, description="corrupt it (see clpeft.scenarios.corruptions)")
    severity: int = Field(5, ge=1, le=5, description="corruption severity")

    @model_validator(mode="after")
    def _one_kind(self) -> Domain:
        kinds = [k for k in ("dataset", "rotation", "corruption") if getattr(self, k) is not None]
        kinds += ["permutation"] if self.permutation else []
        if len(kinds) > 1:
            raise ValueError(f"a domain is one of dataset, rotation, permutation or corruption, not {' and '.join(kinds)}")
        if self.corruption is not None and self.corruption not in CORRUPTIONS:
            raise ValueError(f"unknown corruption '{self.corruption}'{close_matches(self.corruption, CORRUPTIONS)}")
        return self

    def label(self, index: int) -> str:
        if self.name:
            return self.name
        if self.dataset:
            return self.dataset if self.root is None else f"{self.dataset}:{self.root}"
        if self.rotation is not None:
            return f"rotation{self.rotation:g}"
        if self.corruption:
            return f"{self.corruption}@{self.severity}"
        return f"permutation{index}" if self.permutation else "clean"


def _rotate(degrees: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """Counter-clockwise rotation about the centre, bilinear, zero outside (torchvision's ``rotate``)."""
    a = np.deg2rad(degrees)

    def fn(x: torch.Tensor) -> torch.Tensor:
        images = (x.unsqueeze(1) if x.dim() == 3 else x).float()
        H, W = images.shape[-2:]
        # output pixel -> input pixel, in grid_sample's [-1, 1] coordinates (scaled for non-square images)
        theta = torch.tensor([[np.cos(a), -np.sin(a) * H / W, 0.0], [np.sin(a) * W / H, np.cos(a), 0.0]], dtype=torch.float32)
        grid = F.affine_grid(theta.expand(len(images), 2, 3), list(images.shape), align_corners=False)
        out = F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        out = out.round().clamp(0, 255).to(x.dtype) if not x.is_floating_point() else out
        return out.squeeze(1) if x.dim() == 3 else out

    return fn


def _derived_seed(*keys) -> int:
    return int.from_bytes(hashlib.sha256(repr(keys).encode()).digest()[:8], "little") >> 1


def _permute(seed: int, shape: tuple[int, ...]) -> Callable[[torch.Tensor], torch.Tensor]:
    """The same pixel permutation for every image (and every channel), drawn from ``seed``."""
    pixels = int(np.prod(shape[-2:]))
    order = torch.randperm(pixels, generator=torch.Generator().manual_seed(seed))

    def fn(x: torch.Tensor) -> torch.Tensor:
        flat = x.flatten(-2)
        return flat.index_select(-1, order).view_as(x)

    return fn


@register_scenario("domain_incremental")
class DomainIncremental(Scenario):
    """Domain-incremental stream: the same classes, a new domain per experience (van de Ven & Tolias 2019).

    Args:
        seed: run seed (subsampling, permutations and corruption noise draw from it).
        domains: one entry per experience: ``{dataset, root, dataset_options}`` (a dataset of its
            own), ``{rotation: degrees}``, ``{permutation: true}``, ``{corruption, severity}`` or
            ``{}`` (the dataset unchanged); each may set a ``name``.
        dataset: the dataset that rotation, permutation, corruption and ``{}`` domains transform.
        train_per_class: keep at most this many training samples per class in each domain.
        test_per_class: keep at most this many test samples per class in each domain.
        root: where datasets live (also the default ``root`` of dataset domains).
        download: let torchvision download the data (needs internet).
        dataset_options: ``dataset``'s own settings, as in ``class_incremental``.
        corruption_constants: whose constants the corruption domains use: ``cifar`` (CIFAR-10-C's
            generator), ``tinyimagenet`` (Tiny-ImageNet-C's), ``imagenet`` (ImageNet-C's), or
            ``auto``: by the longer image side, CIFAR-10-C's up to 45 px, Tiny-ImageNet-C's from 46
            to 119 px, ImageNet-C's from 120 px.
        online: learn the domains in one pass (:mod:`clpeft.online`), each domain's training
            samples in a seeded random order.
        eval_every: stream samples between anytime-accuracy evaluations (online only).
        task_free: hide the domains' boundaries from the strategy (online only).
    """

    kind = "domain_incremental"

    @flat_options
    def __init__(
        self,
        seed: int,
        domains: list[Domain],
        dataset: str | None = None,
        subsample: Subsample = Subsample(),
        data_source: DataSource = DataSource(),
        corruption_constants: ConstantChoice = "auto",
        online: bool = False,
        eval_every: int = 100,
        task_free: bool = False,
    ):
        self.check_config(flat_params(locals()))
        self.online = online_protocol(online, eval_every, task_free)
        self.seed = seed
        self.corruption_constants = corruption_constants
        self.domains = [Domain.model_validate(d) for d in domains]
        self.dataset = dataset
        self.subsample = subsample
        self.data_source = data_source
        self.input_shape = ()
        self.class_names = []

    @classmethod
    def check_config(cls, p: dict) -> None:
        domains = [Domain.model_validate(d) for d in p["domains"]]
        if not domains:
            raise UserError("expected at least one domain", key="scenario.domains")
        for i, d in enumerate(domains):
            if d.dataset is None and p.get("dataset") is None:
                raise UserError(
                    "this domain transforms the scenario's dataset: set scenario.dataset, or give the domain a dataset of its own",
                    key=f"scenario.domains[{i}]",
                )
            if d.dataset is not None:
                datasets.check_options(d.dataset, d.dataset_options)
        if p.get("dataset") is not None:
            datasets.check_options(p["dataset"], p.get("dataset_options"))
        check_online(p, blurry_allowed=False)

    def experiences(self) -> list[Experience]:
        base = None
        if self.dataset is not None:
            base = self.data_source.load(self.dataset)
        rng = np.random.default_rng(self.seed)
        stream, seen = [], set()
        for i, domain in enumerate(self.domains):
            train, test = self._domain_data(i, domain, base)
            self._check_label_space(i, domain, train)
            train_idx = self.subsample.train(train.targets, rng)
            if self.online is not None:  # the stream's order within the domain
                train_idx = rng.permutation(train_idx)
            train_view = DataView.of(train, train_idx)
            test_view = DataView.of(test, self.subsample.test(test.targets, rng))
            present = sorted(int(c) for c in train_view.targets.unique())
            seen |= set(present)
            stream.append(
                Experience(
                    index=i,
                    train=train_view,
                    test=test_view,
                    classes_in_this_experience=present,
                    classes_seen_so_far=sorted(seen),
                    domain=domain.label(i),
                )
            )
        self.input_shape = tuple(stream[0].train.load([0])[0].shape[1:])
        return self.link(stream)

    def _domain_data(self, i: int, domain: Domain, base):
        if domain.dataset is not None:
            source = self.data_source
            return datasets.load_dataset(domain.dataset, domain.root or source.root, source.download, domain.dataset_options)
        train, test = base
        if domain.corruption is None and domain.rotation is None and not domain.permutation:
            return train, test
        sample = train[0][0]
        if not (isinstance(sample, torch.Tensor) and sample.dtype == torch.uint8 and sample.dim() in (2, 3)):
            raise UserError(
                f"'{self.dataset}' is not an image dataset; rotations, permutations and corruptions need images",
                key=f"scenario.domains[{i}]",
            )
        if domain.corruption is not None:
            return tuple(
                CorruptedDataset(ds, domain.corruption, domain.severity, self.seed, self.corruption_constants) for ds in (train, test)
            )
        if domain.rotation is not None:
            fn = _rotate(domain.rotation)
        else:
            fn = _permute(_derived_seed(self.seed, "permutation", i), tuple(sample.shape))
        return tuple(TransformedDataset(ds, lambda x, _: fn(x), domain.label(i)) for ds in (train, test))

    def _check_label_space(self, i: int, domain: Domain, train: ArrayDataset) -> None:
        names = list(getattr(train, "class_names", None) or [])
        if not self.class_names:
            self.class_names = names or [str(c) for c in range(int(train.targets.max()) + 1)]
        elif names and names != self.class_names:
            raise UserError(
                f"domain {domain.label(i)} has classes {names[:5]}..., the first domain {self.class_names[:5]}...; "
                f"every domain must share one label space",
                key=f"scenario.domains[{i}]",
            )
