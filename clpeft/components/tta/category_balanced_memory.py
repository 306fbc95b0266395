"""RoTTA's category-balanced sampling with timeliness and uncertainty (CSTU) and its loss weights.

Yuan et al., "Robust Test-Time Adaptation in Dynamic Scenarios", CVPR 2023
(https://arxiv.org/abs/2303.13899), section 3.3, Algorithm 1, as the authors' code (``CSTU`` in
Döbler et al.'s benchmark, ``methods/rotta.py``). A memory of ``N`` test samples, each with its
pseudo-label ``c``, prediction entropy ``u`` and age ``a`` (test samples seen since it entered),
scored ``H = lambda_t / (1 + exp(-a / N)) + lambda_u u / ln C`` (eq. 5). A new sample (age 0)
enters when its class holds fewer than ``N / C`` samples and the memory has room; otherwise it
replaces the highest-scoring sample of its own class (if its class is full) or of the fullest
classes, when that score exceeds its own, and is dropped if not. Every sample then ages by one.
The loss weight of a sample of age ``a`` is ``exp(-a / N) / (1 + exp(-a / N))`` (eq. 8).
"""

from __future__ import annotations

import math

import torch
from torch import nn


def timeliness_weight(ages: torch.Tensor, capacity: int) -> torch.Tensor:
    """``exp(-a / N) / (1 + exp(-a / N))`` of each age ``a`` (eq. 8)."""
    scaled = ages.float() / capacity
    return torch.exp(-scaled) / (1 + torch.exp(-scaled))


class CategoryBalancedMemory(nn.Module):
    """CSTU memory of ``capacity`` samples over ``n_classes`` pseudo-classes; saved in the ``state_dict``.

    Args:
        capacity: ``N``.
        n_classes: ``C``.
        lambda_t: weight of timeliness in the score.
        lambda_u: weight of uncertainty in the score.
    """

    def __init__(self, capacity: int, n_classes: int, lambda_t: float = 1.0, lambda_u: float = 1.0):
        super().__init__()
        self.capacity = capacity
        self.n_classes = n_classes
        self.lambda_t = lambda_t
        self.lambda_u = lambda_u
        self.items: list[list[list]] = [[] for _ in range(n_classes)]  # per class: [sample, uncertainty, age]

    def _score(self, age: int, uncertainty: float) -> float:
        return self.lambda_t / (1 + math.exp(-age / self.capacity)) + self.lambda_u * uncertainty / math.log(self.n_classes)

    def add(self, sample: torch.Tensor, label: int, uncertainty: float) -> None:
        """Offer one test sample with its pseudo-label and entropy; every stored sample ages."""
        if self._make_room(label, self._score(0, uncertainty)):
            self.items[label].append([sample, uncertainty, 0])
        for group in self.items:
            for item in group:
                item[2] += 1

    def _make_room(self, label: int, score: float) -> bool:
        if len(self.items[label]) < self.capacity / self.n_classes:
            if sum(len(g) for g in self.items) < self.capacity:
                return True
            fullest = max(len(g) for g in self.items)
            return self._evict([c for c, g in enumerate(self.items) if len(g) == fullest], score)
        return self._evict([label], score)

    def _evict(self, classes: list[int], score: float) -> bool:
        best = None  # (score, class, index): the last of equal scores, as the authors' loop
        for c in classes:
            for i, (_, uncertainty, age) in enumerate(self.items[c]):
                s = self._score(age, uncertainty)
                if best is None or s >= best[0]:
                    best = (s, c, i)
        if best is None:
            return True
        if best[0] > score:
            self.items[best[1]].pop(best[2])
            return True
        return False

    def batch(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The stored samples (class by class) and their ages, or None when empty."""
        stored = [item for group in self.items for item in group]
        if not stored:
            return None
        return torch.stack([s for s, _, _ in stored]), torch.tensor([a for _, _, a in stored])

    def get_extra_state(self) -> dict:
        return {"items": [[[s.clone(), float(u), int(a)] for s, u, a in group] for group in self.items]}

    def set_extra_state(self, state: dict) -> None:
        self.items = [[[s.clone(), u, a] for s, u, a in group] for group in state["items"]]
        self.n_classes = len(self.items)
