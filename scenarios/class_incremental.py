"""Class-incremental streams: disjoint groups of classes, one group per experience.

The protocol of iCaRL (Rebuffi et al., CVPR 2017, https://arxiv.org/abs/1611.07725) and of the
pretrained-model benchmarks (e.g. 10 experiences of 10 classes on CIFAR-100; "B50" = a first
experience of 50 classes, then equal groups). Labels are renumbered in the order classes
appear in the stream, so the classes of experience ``i`` are always ``0..`` contiguous after
those of experience ``i-1`` and a growing head needs no bookkeeping.
"""

from __future__ import annotations

from typing import Annotated, Literal

import numpy as np
import torch
from pydantic import Field

from clpeft.data import ArrayDataset, DataView
from clpeft.errors import UserError
from clpeft.experience import Experience, Scenario
from clpeft.registry import register_scenario
from clpeft.scenarios import datasets
from clpeft.scenarios.data_source import DataSource, Subsample
from clpeft.scenarios.online import Blurry, blurry_split, check_online, first_appearance_order, online_protocol
from clpeft.schema import flat_options, flat_params


def require_samples(stream: list[Experience], class_names: list[str]) -> None:
    """Every experience has training and test samples (an empty test set cannot be scored).

    Loaders already refuse a class missing from one split; this guards the stream itself.
    """
    for e in stream:
        for part, view in (("training", e.train), ("test", e.test)):
            if view is not None and len(view) == 0:
                classes = ", ".join(class_names[c] for c in e.classes_in_this_experience)
                raise UserError(
                    f"experience {e.index} (classes {classes}) has no {part} samples; every class needs "
                    f"training and test samples: check the data's splits",
                    key="scenario.dataset",
                )


@register_scenario("class_incremental")
class ClassIncremental(Scenario):
    """Class-incremental stream: each experience brings new classes (iCaRL protocol).

    Args:
        seed: run seed (subsampling draws from it).
        dataset: ``sklearn_digits``, ``fashion_mnist``, ``chatterbot``, ``rotten_tomatoes`` (offline;
            the last two are text), ``mnist``, ``cifar10``, ``cifar100``; a user's own data under
            ``root``: ``image_folder``, ``npz``, ``jsonl``, ``csv``; ``imagenet_r``, ``cub200``,
            ``mini_imagenet`` (their published layouts under ``root``).
        n_experiences: number of experiences ``T``.
        init_classes: classes in the first experience (B0 when None: all groups equal).
        class_order: an explicit permutation of the class ids, an integer seed for a random one
            (1993 is the customary seed), or ``random``: the run's own ``seed``, so each of ``--seeds``
            gets its own order (PyCIL/PILOT's repeated runs); None keeps the natural order.
        train_per_class: keep at most this many training samples per class (seeded).
        test_per_class: keep at most this many test samples per class (seeded).
        root: where datasets live (and download to); for a user's own data, the folder or file.
        download: let torchvision download the data (needs internet).
        dataset_options: the dataset's own settings, e.g. ``{image_size: 64, test_fraction: 0.2}``
            for ``image_folder`` or ``{text_column: review}`` for ``jsonl``/``csv``.
        online: learn the stream in one pass (:mod:`clpeft.online`): each experience's training
            samples in a seeded random order, labels renumbered in order of first appearance.
        eval_every: stream samples between anytime-accuracy evaluations (online only).
        task_free: hide the experiences' boundaries from the strategy (online only; see
            :mod:`clpeft.online` for what it sees instead).
        blurry: i-Blurry-N-M class mixing, ``{disjoint: N, blurry: M}`` in percent (online only;
            defined in :mod:`clpeft.scenarios.online`).
    """

    kind = "class_incremental"

    @flat_options
    def __init__(
        self,
        seed: int,
        dataset: str,
        n_experiences: int,
        init_classes: int | None = None,
        class_order: list[int] | Annotated[int, Field(ge=0, le=2**32 - 1)] | Literal["random"] | None = None,
        subsample: Subsample = Subsample(),
        data_source: DataSource = DataSource(),
        online: bool = False,
        eval_every: int = 100,
        task_free: bool = False,
        blurry: Blurry | None = None,
    ):
        self.check_config(flat_params(locals()))
        self.online = online_protocol(online, eval_every, task_free)
        self.blurry = Blurry.model_validate(blurry) if isinstance(blurry, dict) else blurry
        self.seed = seed
        self.dataset = dataset
        self.n_experiences = n_experiences
        self.init_classes = init_classes
        self.class_order = class_order
        self.subsample = subsample
        self.data_source = data_source
        self.input_shape = ()
        self.class_names = []

    @staticmethod
    def group_sizes(n_classes: int, n_experiences: int, init_classes: int | None) -> list[int]:
        """Classes per experience; raises UserError when they do not divide evenly."""
        if init_classes is None:
            if n_classes % n_experiences:
                raise UserError(
                    f"{n_classes} classes do not split into {n_experiences} equal experiences; "
                    f"choose a divisor of {n_classes} or set scenario.init_classes",
                    key="scenario.n_experiences",
                )
            return [n_classes // n_experiences] * n_experiences
        rest = n_classes - init_classes
        if n_experiences == 1:
            if rest:
                raise UserError(f"one experience must hold all {n_classes} classes", key="scenario.init_classes")
            return [init_classes]
        if rest <= 0 or rest % (n_experiences - 1):
            raise UserError(
                f"the {rest} classes after the first {init_classes} do not split into {n_experiences - 1} equal experiences",
                key="scenario.init_classes",
            )
        return [init_classes] + [rest // (n_experiences - 1)] * (n_experiences - 1)

    @classmethod
    def check_config(cls, p: dict) -> None:
        """Checks that need no data: counts, divisibility, the class order, the dataset options.

        For a user's own data the class count is known only once it is read; the same checks
        then run in :meth:`experiences`.
        """
        datasets.check_options(p["dataset"], p.get("dataset_options"))  # also rejects unknown datasets
        check_online(p)
        T = p["n_experiences"]
        if T < 1:
            raise UserError(f"expected at least 1 experience, got {T}", key="scenario.n_experiences")
        C = datasets.n_classes(p["dataset"])
        if C is not None:
            cls.check_counts(C, p, p["dataset"])

    @classmethod
    def check_counts(cls, C: int, p: dict, source: str) -> None:
        """Checks against the class count ``C`` of ``source`` (a dataset name or the data's root)."""
        T = p["n_experiences"]
        if T > C:
            raise UserError(f"{T} experiences but '{source}' has only {C} classes", key="scenario.n_experiences")
        if p.get("init_classes") is not None and not 0 < p["init_classes"] <= C:
            raise UserError(f"must be between 1 and {C}, got {p['init_classes']}", key="scenario.init_classes")
        order = p.get("class_order")
        if isinstance(order, list) and sorted(order) != list(range(C)):
            raise UserError(f"must be a permutation of 0..{C - 1}, got {order}", key="scenario.class_order")
        cls.group_sizes(C, T, p.get("init_classes"))

    def _order(self, n_classes: int) -> np.ndarray:
        if isinstance(self.class_order, list):
            return np.asarray(self.class_order)
        if self.class_order is not None:
            # np.random.seed(s); np.random.permutation(C): the order PyCIL/PILOT papers report
            seed = self.seed if self.class_order == "random" else self.class_order
            return np.random.RandomState(seed % 2**32).permutation(n_classes)
        return np.arange(n_classes)

    def experiences(self) -> list[Experience]:
        train, test = self.data_source.load(self.dataset)
        C = datasets.n_classes(self.dataset) or len(train.class_names)
        if datasets.n_classes(self.dataset) is None:
            self.check_counts(C, vars(self), self.data_source.root)
        order = self._order(C)
        mapping = torch.empty(C, dtype=torch.long)
        mapping[torch.from_numpy(order)] = torch.arange(C)
        names = [train.class_names[c] for c in order] if train.class_names else [str(c) for c in order]
        train, test = train.relabel(mapping, names), test.relabel(mapping, names)
        self.input_shape = tuple(train.inputs.shape[1:])
        self.class_names = names
        rng = np.random.default_rng(self.seed)
        train_idx = self.subsample.train(train.targets, rng)
        test_idx = self.subsample.test(test.targets, rng)
        sizes = self.group_sizes(C, self.n_experiences, self.init_classes)
        groups = [list(range(a, a + n)) for a, n in zip(np.cumsum([0, *sizes[:-1]]).tolist(), sizes)]
        if self.online is not None:
            return self._online_stream(train, test, train_idx, test_idx, groups, rng)
        stream = [
            Experience(
                index=i,
                train=self._view(train, train_idx, classes),
                test=self._view(test, test_idx, classes),
                classes_in_this_experience=classes,
                classes_seen_so_far=list(range(classes[-1] + 1)),
            )
            for i, classes in enumerate(groups)
        ]
        require_samples(stream, self.class_names)
        return self.link(stream)

    def _online_stream(
        self,
        train: ArrayDataset,
        test: ArrayDataset,
        train_idx: np.ndarray,
        test_idx: np.ndarray,
        groups: list[list[int]],
        rng: np.random.Generator,
    ) -> list[Experience]:
        """The online stream: the (blurry) split in stream order, labels renumbered by first appearance."""
        positions = blurry_split(train.targets.numpy()[train_idx], groups, self.blurry, rng)
        order = [train_idx[p] for p in positions]
        mapping = first_appearance_order(train.targets, order, len(self.class_names))
        names = [""] * len(self.class_names)
        for old, new in enumerate(mapping.tolist()):
            names[new] = self.class_names[old]
        self.class_names = names
        train, test = train.relabel(mapping, names), test.relabel(mapping, names)
        stream, seen = [], set()
        for i, (idx, group) in enumerate(zip(order, groups)):
            present = sorted(set(train.targets[torch.as_tensor(idx, dtype=torch.long)].tolist()))
            seen.update(present)
            stream.append(
                Experience(
                    index=i,
                    train=DataView.of(train, idx),
                    test=self._view(test, test_idx, mapping[group].tolist()),
                    classes_in_this_experience=present,
                    classes_seen_so_far=sorted(seen),
                )
            )
        require_samples(stream, names)
        return self.link(stream)

    @staticmethod
    def _view(ds: ArrayDataset, subset: np.ndarray, classes: list[int]) -> DataView:
        mask = np.isin(ds.targets.numpy()[subset], classes)
        return DataView.of(ds, subset[mask])
