"""Online continual learning: one pass over the stream, anytime evaluation, task-free chunks.

A scenario with ``online: true`` (:class:`~clpeft.experience.OnlineProtocol`) makes its
experiences' ``train`` views, concatenated in order, **the stream**: ``N`` samples, position
``p`` counting the samples before it. The engine (:func:`clpeft.loops.run_online`)
trains on it once:

* **Training units.** The strategy is handed *units*, each an :class:`Experience` it trains on
  with the usual hooks (``before_experience``, ``train_data``, one epoch of ``training_step``
  in the engine's seeded shuffle, ``after_experience``). With ``task_free: false`` the units are
  the scenario's experiences. With ``task_free: true`` they are *chunks* of the stream: a chunk
  ends at every evaluation point (multiples of ``eval_every``) and before every batch of
  ``train.batch_size`` stream samples (counted from the chunk's start) that holds a class not
  seen earlier in the stream. So the hooks fire only at those points, never because an
  experience ended (unless it ends at one of them), and a class is announced
  (``classes_seen_so_far`` grows, the default head grows) just before the first batch that
  holds it: a chunk's new classes all lie in its first batch. A chunk carries ``test=None``,
  ``task_label=0`` and no ``domain``; its ``past`` are the earlier chunks (replay memories keep
  positions into them). No ``before_evaluation``/``after_evaluation`` hook is called.
* **Evaluation points.** Every ``eval_every`` stream samples the model is scored on the test
  data of the classes seen so far (those with a sample before that position): the *anytime
  accuracy* ``f(n)`` of Koh et al., "Online Continual Learning on Class Incremental Blurry Task
  Configuration with Anytime Inference", ICLR 2022 (https://arxiv.org/abs/2110.10031). At every
  experience's end the full row of the accuracy matrix is measured as offline (with the
  evaluation hooks when ``task_free`` is false), so :func:`clpeft.metrics.summarize` still
  applies. A point inside a unit is evaluated between two optimizer steps: the stream position
  after a step is ``start + floor(len(unit) * t / len(train_data))``, ``t`` the training samples
  consumed so far (exactly the stream samples trained on when ``train_data`` is the unit's own
  data; in proportion when a method adds a memory to it). Mid-unit evaluation leaves the random
  state and the modules' train/eval modes as they were, so it does not change training.
* **Metrics.** :func:`clpeft.metrics.anytime_summary`: ``a_auc`` (Koh et al.'s ``A_auc``), the
  curve, throughput; checkpoints are written after every unit, and ``--resume`` continues at
  the next unit, bitwise.
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

import torch

from clpeft.data import DataView
from clpeft.experience import Experience, OnlineProtocol

__all__ = ["OnlinePlan", "plan_online"]


@dataclass
class OnlinePlan:
    """The units, spans and evaluation points of an online stream (see the module docstring)."""

    units: list[Experience]
    spans: list[tuple[int, int]]  # each unit's stream positions [start, end)
    task_ends: list[int]  # the stream position where experience i's training data ends
    eval_points: list[int]  # multiples of eval_every, up to N
    first_seen: dict[int, int]  # class -> position of its first sample
    test: DataView  # every experience's test data, concatenated
    _test_labels: torch.Tensor = field(default=None, repr=False)

    @property
    def n_samples(self) -> int:
        return self.spans[-1][1] if self.spans else 0

    def points_in(self, start: int, end: int) -> list[int]:
        """The evaluation points and experience ends in ``(start, end]``, in order."""
        return sorted(p for p in {*self.eval_points, *self.task_ends} if start < p <= end)

    def seen_test(self, position: int) -> DataView:
        """The test data of the classes with a stream sample before ``position``."""
        if self._test_labels is None:
            self._test_labels = self.test.targets
        seen = torch.tensor([c for c, p in self.first_seen.items() if p < position], dtype=torch.long)
        return self.test.take(torch.nonzero(torch.isin(self._test_labels, seen)).flatten())


def plan_online(stream: list[Experience], protocol: OnlineProtocol, batch_size: int) -> OnlinePlan:
    """Units, spans and evaluation points of ``stream`` learned online under ``protocol``."""
    whole = DataView([])
    for exp in stream:
        whole = whole + exp.train
    labels = whole.targets.tolist()
    first_seen: dict[int, int] = {}
    for p, c in enumerate(labels):
        first_seen.setdefault(c, p)
    task_ends = torch.tensor([len(e.train) for e in stream]).cumsum(0).tolist()
    N = len(labels)
    eval_points = list(range(protocol.eval_every, N + 1, protocol.eval_every))
    test = DataView([])
    for exp in stream:
        test = test + exp.test
    if not protocol.task_free:
        spans = list(zip([0, *task_ends[:-1]], task_ends))
        units = list(stream)
    else:
        spans = _chunks(labels, eval_points, batch_size)
        units = []
        for u, (a, b) in enumerate(spans):
            units.append(
                Experience(
                    index=u,
                    train=whole.take(torch.arange(a, b)),
                    test=None,
                    classes_in_this_experience=sorted(set(labels[a:b])),
                    classes_seen_so_far=sorted(c for c, p in first_seen.items() if p < b),
                    past=tuple(units),
                    stream_length=len(spans),
                    classes_in_stream=sorted(first_seen),
                )
            )
    return OnlinePlan(units, spans, task_ends, eval_points, first_seen, test)


def _chunks(labels: list[int], eval_points: list[int], batch_size: int) -> list[tuple[int, int]]:
    """Task-free chunks: cut at every evaluation point and before every batch with a new class."""
    N = len(labels)
    cuts = sorted({0, N, *eval_points})
    first = {}
    for p, c in enumerate(labels):
        first.setdefault(c, p)
    arrivals = sorted(first.values())
    spans = []
    for a, b in zip(cuts[:-1], cuts[1:]):
        start = a
        for s in range(a + batch_size, b, batch_size):  # batch starts after the segment's first
            k = bisect.bisect_left(arrivals, s)
            if k < len(arrivals) and arrivals[k] < min(s + batch_size, b):
                spans.append((start, s))
                start = s
        spans.append((start, b))
    return spans
