"""Few-shot class-incremental streams: a base session, then N-way K-shot sessions.

Tao et al., "Few-Shot Class-Incremental Learning", CVPR 2020 (https://arxiv.org/abs/2004.10956):
session 0 holds ``n_base`` classes with all their training data; each later session brings
``n_way`` new classes with ``k_shot`` training samples each. Every session is evaluated on the
test data of all classes seen so far. The standard protocols, for users with the data:

* CIFAR-100 and miniImageNet: 60 base classes, then 8 sessions of 5-way 5-shot;
* CUB-200-2011: 100 base classes, then 10 sessions of 10-way 5-shot.

``session_lists: cec`` (the default for these three datasets) uses the fixed lists of TOPIC and
CEC that the published numbers come from (:mod:`clpeft.scenarios.cec_sessions`; mini-ImageNet
then takes CEC's fixed train/test split, ``dataset_options.split: cec``). ``session_lists:
random`` (the default elsewhere) draws the shots once per seed (classes in their natural order
unless ``class_order`` says otherwise). Either way the stream is written to
``fscil_sessions.json`` in the run directory, so a run can be audited and its exact stream
replayed with ``sessions_file``. Labels are renumbered in stream order, as in
``class_incremental``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
import torch
from pydantic import Field

from clpeft.data import ArrayDataset, DataView
from clpeft.errors import UserError
from clpeft.experience import Experience, Scenario
from clpeft.registry import register_scenario
from clpeft.scenarios import cec_sessions, datasets
from clpeft.scenarios.class_incremental import require_samples
from clpeft.scenarios.data_source import DataSource, per_class_subset
from clpeft.schema import flat_options, flat_params

SESSIONS_FILE = "fscil_sessions.json"
FORMAT = 1


@register_scenario("few_shot_class_incremental")
class FewShotClassIncremental(Scenario):
    """Few-shot class-incremental stream: base session, then N-way K-shot sessions (Tao et al. 2020).

    Args:
        seed: run seed (draws the shots and the subsets).
        dataset: as in ``class_incremental`` (``cifar100``, ``mini_imagenet``, ``cub200`` for the
            published protocols; ``sklearn_digits``, ``fashion_mnist`` offline).
        n_base: classes of the base session.
        n_way: new classes per incremental session.
        k_shot: training samples per new class.
        n_sessions: incremental sessions after the base one; default: as many as the classes allow.
        class_order: a permutation of the class ids, or an integer seed for a random one.
        base_per_class: keep at most this many base-session training samples per class.
        test_per_class: keep at most this many test samples per class.
        sessions_file: replay the classes and sample indices of a ``fscil_sessions.json``.
        session_lists: ``cec``: the fixed session lists of TOPIC/CEC (classes, base data, shots
            and test data as CEC's official code reads them; ``cifar100``, ``mini_imagenet``,
            ``cub200`` only, with their protocols' ``n_base``/``n_way``/``k_shot``); ``random``:
            shots drawn from the seed. Default: ``cec`` for those three datasets, else ``random``.
        root: where datasets live (and download to); for a user's own data, the folder.
        download: let torchvision download the data (needs internet).
        dataset_options: the dataset's own settings, as in ``class_incremental``.
    """

    kind = "few_shot_class_incremental"

    @flat_options
    def __init__(
        self,
        seed: int,
        dataset: str,
        n_base: Annotated[int, Field(ge=1)],
        n_way: Annotated[int, Field(ge=1)],
        k_shot: Annotated[int, Field(ge=1)],
        n_sessions: Annotated[int, Field(ge=0)] | None = None,
        class_order: list[int] | Annotated[int, Field(ge=0, le=2**32 - 1)] | None = None,
        base_per_class: Annotated[int, Field(ge=1)] | None = None,
        test_per_class: Annotated[int, Field(ge=1)] | None = None,
        sessions_file: str | None = None,
        session_lists: Literal["cec", "random"] | None = None,
        data_source: DataSource = DataSource(),
    ):
        self.check_config(flat_params(locals()))
        self.seed = seed
        self.dataset = dataset
        self.n_base, self.n_way, self.k_shot, self.n_sessions = n_base, n_way, k_shot, n_sessions
        self.class_order = class_order
        self.base_per_class = base_per_class
        self.test_per_class = test_per_class
        self.sessions_file = sessions_file
        self.session_lists = self.resolve_session_lists(flat_params(locals()))
        self.data_source = data_source
        self.input_shape = ()
        self.class_names = []
        self.plan: dict | None = None

    @classmethod
    def check_config(cls, p: dict) -> None:
        datasets.check_options(p["dataset"], p.get("dataset_options"))
        C = datasets.n_classes(p["dataset"])
        if C is not None:
            cls.check_counts(C, p)
        cls.resolve_session_lists(p)

    @staticmethod
    def resolve_session_lists(p: dict) -> str:
        """``cec`` or ``random`` (see ``session_lists``), checked against the other settings."""
        dataset, lists = p["dataset"], p.get("session_lists")
        if lists is None:
            lists = "cec" if dataset in cec_sessions.PROTOCOLS and p.get("sessions_file") is None else "random"
        if lists == "random":
            return lists
        key = "scenario.session_lists"
        if dataset not in cec_sessions.PROTOCOLS:
            raise UserError(
                f"CEC has session lists for {', '.join(cec_sessions.PROTOCOLS)} only, not '{dataset}'; set session_lists: random", key=key
            )
        n_base, n_way, k_shot, n_sessions = cec_sessions.PROTOCOLS[dataset]
        why = (
            f"(CEC's lists for {dataset}: {n_base} base classes, then {n_sessions} sessions of {n_way}-way {k_shot}-shot; "
            f"session_lists: cec is the default for {dataset}); set session_lists: random to draw other sessions"
        )
        for name, value in (("n_base", n_base), ("n_way", n_way), ("k_shot", k_shot)):
            if p[name] != value:
                raise UserError(f"must be {value} with CEC's session lists {why}", key=f"scenario.{name}")
        if p.get("n_sessions") is not None and p["n_sessions"] > n_sessions:
            raise UserError(f"at most {n_sessions} with CEC's session lists {why}", key="scenario.n_sessions")
        for name in ("class_order", "base_per_class", "test_per_class", "sessions_file"):
            if p.get(name) is not None:
                raise UserError(f"the fixed lists set the classes and samples {why}", key=f"scenario.{name}")
        split = (p.get("dataset_options") or {}).get("split", "cec")
        if dataset == "mini_imagenet" and split != "cec":
            raise UserError(f"CEC's lists index CEC's train/test split (split: cec) {why}", key="scenario.dataset_options.split")
        return lists

    @staticmethod
    def check_counts(C: int, p: dict) -> int:
        """The number of incremental sessions, checked against the class count ``C``."""
        rest = C - p["n_base"]
        if rest < 0:
            raise UserError(f"the dataset has only {C} classes", key="scenario.n_base")
        sessions = p.get("n_sessions")
        if sessions is None:
            sessions = rest // p["n_way"]
        elif p["n_base"] + sessions * p["n_way"] > C:
            raise UserError(
                f"{p['n_base']} base + {sessions} x {p['n_way']} classes exceed the {C} classes of the dataset", key="scenario.n_sessions"
            )
        order = p.get("class_order")
        if isinstance(order, list) and sorted(order) != list(range(C)):
            raise UserError(f"must be a permutation of 0..{C - 1}, got {order}", key="scenario.class_order")
        return sessions

    # ------------------------------------------------------------------ the stream

    def experiences(self) -> list[Experience]:
        options = self.data_source.dataset_options
        if self.session_lists == "cec" and self.dataset == "mini_imagenet":
            options = {**(options or {}), "split": "cec"}
        train, test = self.data_source.load(self.dataset, options)
        C = datasets.n_classes(self.dataset) or len(train.class_names)
        if self.sessions_file:
            self.plan = self._read_plan(train, test, C)
        elif self.session_lists == "cec":
            self.plan = self._cec_plan(train, test)
        else:
            self.plan = self._draw_plan(train, test, C)
        order = np.asarray(self.plan["class_order"])
        mapping = torch.full((C,), -1, dtype=torch.long)
        mapping[torch.from_numpy(order)] = torch.arange(len(order))
        names = [train.class_names[c] if train.class_names else str(c) for c in order]
        train, test = train.relabel(mapping, names), test.relabel(mapping, names)  # -1: classes left out
        self.input_shape = tuple(train.inputs.shape[1:])
        self.class_names = names
        test_idx = np.asarray(self.plan["test_indices"], dtype=np.int64)
        stream, first = [], 0
        for s in self.plan["sessions"]:
            classes = list(range(first, first + len(s["classes"])))
            first += len(classes)
            test_view = test_idx[np.isin(test.targets.numpy()[test_idx], classes)]
            stream.append(
                Experience(
                    index=s["session"],
                    train=DataView.of(train, s["train_indices"]),
                    test=DataView.of(test, test_view),
                    classes_in_this_experience=classes,
                    classes_seen_so_far=list(range(first)),
                    n_way=len(classes),
                    k_shot=s["k_shot"],
                )
            )
        require_samples(stream, names)
        return self.link(stream)

    def _cec_plan(self, train: ArrayDataset, test: ArrayDataset) -> dict:
        """CEC's sessions (:mod:`~clpeft.scenarios.cec_sessions`), checked against the data."""
        n_sessions = self.n_sessions if self.n_sessions is not None else cec_sessions.PROTOCOLS[self.dataset][3]
        keys = cec_sessions.training_keys(self.dataset, Path(self.data_source.root).expanduser())
        order, sessions, test_idx = cec_sessions.plan(self.dataset, train.targets.numpy(), test.targets.numpy(), keys, n_sessions)
        return {
            "format": FORMAT,
            "dataset": self.dataset,
            "seed": self.seed,
            "session_lists": "cec",
            "class_order": order,
            "sessions": sessions,
            "test_indices": test_idx,
        }

    def _draw_plan(self, train: ArrayDataset, test: ArrayDataset, C: int) -> dict:
        """Classes, shots and test subset, drawn once from the seed."""
        sessions = self.check_counts(C, vars(self))
        if isinstance(self.class_order, list):
            order = np.asarray(self.class_order)
        elif isinstance(self.class_order, int):
            order = np.random.RandomState(self.class_order).permutation(C)
        else:
            order = np.arange(C)
        order = order[: self.n_base + sessions * self.n_way]
        rng = np.random.default_rng(self.seed)
        y = train.targets.numpy()
        base = order[: self.n_base]
        keep = per_class_subset(train.targets, self.base_per_class, rng)
        plan = [{"session": 0, "classes": base.tolist(), "k_shot": None, "train_indices": keep[np.isin(y[keep], base)].tolist()}]
        for s in range(sessions):
            classes = order[self.n_base + s * self.n_way : self.n_base + (s + 1) * self.n_way]
            shots = []
            for c in classes:
                pool = np.flatnonzero(y == c)
                if len(pool) < self.k_shot:
                    raise UserError(f"class {c} has {len(pool)} training samples, fewer than k_shot={self.k_shot}", key="scenario.k_shot")
                shots.append(np.sort(rng.choice(pool, self.k_shot, replace=False)))
            plan.append(
                {"session": s + 1, "classes": classes.tolist(), "k_shot": self.k_shot, "train_indices": np.concatenate(shots).tolist()}
            )
        test_keep = per_class_subset(test.targets, self.test_per_class, rng)
        test_keep = test_keep[np.isin(test.targets.numpy()[test_keep], order)]
        return {
            "format": FORMAT,
            "dataset": self.dataset,
            "seed": self.seed,
            "class_order": order.tolist(),
            "sessions": plan,
            "test_indices": test_keep.tolist(),
        }

    def _read_plan(self, train: ArrayDataset, test: ArrayDataset, C: int) -> dict:
        """A saved plan, checked against this scenario's shape and the data."""
        path = Path(self.sessions_file).expanduser()
        key = "scenario.sessions_file"
        try:
            plan = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise UserError(f"cannot read {path} ({exc})", key=key) from None
        plan = plan if isinstance(plan, dict) else {}
        if plan.get("format") != FORMAT or plan.get("dataset") != self.dataset:
            raise UserError(
                f"{path} is a plan for dataset '{plan.get('dataset')}' (format {plan.get('format')}), "
                f"not '{self.dataset}' (format {FORMAT})",
                key=key,
            )
        if (
            plan.get("session_lists") == "cec"
            and self.dataset == "mini_imagenet"
            and (self.data_source.dataset_options or {}).get("split") != "cec"
        ):
            raise UserError(
                f"{path} holds CEC's sessions, which index CEC's train/test split; set dataset_options: {{split: cec}}", key=key
            )
        try:
            sessions = plan["sessions"]
            shape = (len(sessions[0]["classes"]), [len(s["classes"]) for s in sessions[1:]], [s["k_shot"] for s in sessions[1:]])
            order = np.asarray(plan["class_order"], dtype=np.int64)
            test_idx = np.asarray(plan["test_indices"], dtype=np.int64)
            train_idx = [np.asarray(s["train_indices"], dtype=np.int64) for s in sessions]
        except (KeyError, TypeError, IndexError, ValueError) as exc:
            raise UserError(
                f"{path} is not a complete sessions plan ({type(exc).__name__}: {exc}); use the {SESSIONS_FILE} a run wrote", key=key
            ) from None
        wanted = (self.n_base, [self.n_way] * (len(sessions) - 1), [self.k_shot] * (len(sessions) - 1))
        if shape != wanted or (self.n_sessions is not None and self.n_sessions != len(sessions) - 1):
            raise UserError(
                f"{path} holds {shape[0]} base classes and sessions of {shape[1]} classes x {shape[2]} shots; "
                f"set n_base, n_way, k_shot and n_sessions to match",
                key=key,
            )
        if order.ndim != 1 or len(np.unique(order)) != len(order) or not ((order >= 0) & (order < C)).all():
            raise UserError(f"{path}: class_order must list distinct class ids of 0..{C - 1}", key=key)
        if test_idx.ndim != 1 or not ((test_idx >= 0) & (test_idx < len(test))).all():
            raise UserError(f"{path}: test_indices must lie in 0..{len(test) - 1}, this dataset's test split", key=key)
        y = train.targets.numpy()
        for s, idx in zip(sessions, train_idx):
            if len(idx) and (idx.min() < 0 or idx.max() >= len(y) or not np.isin(y[idx], s["classes"]).all()):
                raise UserError(
                    f"{path}: the indices of session {s['session']} do not match the classes of this dataset's training split", key=key
                )
        return plan

    def save_artifacts(self, out_dir: Path) -> None:
        """``fscil_sessions.json``: class order, each session's classes and training indices
        (into the dataset's training split, original class ids) and the test indices."""
        if self.plan is not None:
            tmp = Path(out_dir) / f".{SESSIONS_FILE}.tmp"
            tmp.write_text(json.dumps(self.plan))
            tmp.replace(Path(out_dir) / SESSIONS_FILE)
