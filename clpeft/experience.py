"""Experiences and scenarios: what a stream of data looks like to the engine."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import ClassVar

from clpeft.data import DataView


@dataclass
class Experience:
    """One step of a continual stream.

    Attributes:
        index: position in the stream (0-based).
        train: training data (``None`` where a stream has none, e.g. test-time adaptation).
        test: this experience's test data (``None`` for test-time adaptation streams).
        classes_in_this_experience: label ids first seen here.
        classes_seen_so_far: label ids seen in experiences ``0..index``.
        task_label: task id, for task-incremental use only.
        n_way, k_shot: few-shot session shape, where it applies.
        past: the earlier experiences of the stream, so a strategy can rebuild the data it
            stored (replay buffers keep positions into them, not copies).
    """

    index: int
    train: DataView | None
    test: DataView | None
    classes_in_this_experience: list[int]
    classes_seen_so_far: list[int]
    task_label: int = 0
    n_way: int | None = None
    k_shot: int | None = None
    past: tuple[Experience, ...] = field(default=(), repr=False)

    @property
    def n_classes_seen(self) -> int:
        """Size of the label space needed so far (label ids are contiguous from 0)."""
        return max(self.classes_seen_so_far) + 1 if self.classes_seen_so_far else 0


class Scenario(ABC):
    """Turns data into a stream of experiences. No training logic lives here.

    Subclasses set :attr:`kind` (strategies declare which kinds they support) and fill
    :attr:`class_names` and :attr:`input_shape` (the raw input shape of one sample, handed to
    the backbone).
    """

    kind: ClassVar[str] = "class_incremental"
    class_names: list[str]
    input_shape: tuple[int, ...]

    @abstractmethod
    def experiences(self) -> list[Experience]:
        """The whole stream, in order. Called once per run."""

    @staticmethod
    def link(experiences: list[Experience]) -> list[Experience]:
        """Give every experience a reference to the ones before it."""
        for i, exp in enumerate(experiences):
            exp.past = tuple(experiences[:i])
        return experiences
