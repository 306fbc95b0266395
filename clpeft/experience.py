"""Experiences and scenarios: what a stream of data looks like to the engine."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

from clpeft.data import DataView


@dataclass
class Experience:
    """One step of a continual stream.

    Attributes:
        index: position in the stream (0-based).
        train: training data (``None`` where a stream has none, e.g. test-time adaptation).
        test: this experience's test data (``None`` for test-time adaptation streams).
        classes_in_this_experience: label ids of this experience's training data (the new
            classes in class-incremental streams; every class present in domain-incremental ones).
        classes_seen_so_far: label ids seen in experiences ``0..index``.
        task_label: task id, for task-incremental use only.
        n_way, k_shot: few-shot session shape, where it applies.
        domain: the domain's name in domain-incremental and test-time-adaptation streams
            (``"gaussian_noise@5"``, ``"sketch"``; ``"mixed"`` for a mixed-domain chunk).
        past: the earlier experiences of the stream, so a strategy can rebuild the data it
            stored (replay buffers keep positions into them, not copies).
        stream_length: the number of experiences in the stream (set by the engine; ``None``
            when unknown), for schedules over tasks such as InfLoRA's threshold.
        classes_in_stream: every label id the stream's experiences bring (set by the engine;
            ``None`` when unknown), for a method whose network has every class's output from
            the start (DER's, as in Mammoth).
    """

    index: int
    train: DataView | None
    test: DataView | None
    classes_in_this_experience: list[int]
    classes_seen_so_far: list[int]
    task_label: int = 0
    n_way: int | None = None
    k_shot: int | None = None
    domain: str | None = None
    past: tuple[Experience, ...] = field(default=(), repr=False)
    stream_length: int | None = None
    classes_in_stream: list[int] | None = None

    @property
    def n_classes_seen(self) -> int:
        """Size of the label space needed so far (label ids are contiguous from 0)."""
        return max(self.classes_seen_so_far) + 1 if self.classes_seen_so_far else 0


@dataclass(frozen=True)
class OnlineProtocol:
    """How an online stream is run (a scenario's ``online: true``; see :mod:`clpeft.online`).

    Attributes:
        eval_every: stream samples between anytime-accuracy evaluations (Koh et al. 2022's
            ``eval_period``).
        task_free: hide the experiences' boundaries from the strategy: it sees the stream as
            chunks that end at evaluation points and at batches bringing a class never seen.
    """

    eval_every: int
    task_free: bool = False


class Scenario(ABC):
    """Turns data into a stream of experiences. No training logic lives here.

    Subclasses set :attr:`kind` (strategies declare which kinds they support) and fill
    :attr:`class_names` and :attr:`input_shape` (the raw input shape of one sample, handed to
    the backbone).

    Kinds: ``class_incremental``, ``few_shot_class_incremental`` (adds session metrics),
    ``domain_incremental`` and ``test_time_adaptation``. A test-time-adaptation scenario also
    sets ``source`` (the clean labelled training data of the source model, or None when
    ``source_checkpoint`` names a checkpoint to load) and ``reset_each_domain``; its experiences
    are the domains ``1..D`` (``train`` None, ``test`` the domain's data, ``domain`` its name),
    experience 0 being the source phase the engine runs (see :mod:`clpeft.loops.test_time`).

    :attr:`online` is set (an :class:`OnlineProtocol`) when the stream is to be learned online:
    each training sample once, in the order the experiences' ``train`` views list them (the
    stream is their concatenation), with anytime evaluation (:mod:`clpeft.online`).
    """

    kind: ClassVar[str] = "class_incremental"
    online: OnlineProtocol | None = None
    class_names: list[str]
    input_shape: tuple[int, ...]

    @abstractmethod
    def experiences(self) -> list[Experience]:
        """The whole stream, in order. Called once per run."""

    def save_artifacts(self, out_dir: Path) -> None:  # noqa: B027 (an optional hook: doing nothing is the default)
        """Write what a run needs to be audited or reproduced (e.g. the drawn sample indices)
        into the run directory. Called by the engine once the stream is built; default: nothing."""

    @staticmethod
    def link(experiences: list[Experience]) -> list[Experience]:
        """Give every experience a reference to the ones before it."""
        for i, exp in enumerate(experiences):
            exp.past = tuple(experiences[:i])
        return experiences
