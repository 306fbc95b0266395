"""Replay buffers that store positions into past experiences, not copies of the data.

Policies:

* ``reservoir`` -- reservoir sampling over the stream of training samples (Vitter, 1985;
  as in Chaudhry et al., "On Tiny Episodic Memories in Continual Learning", 2019,
  https://arxiv.org/abs/1902.10486): every sample seen so far is in the buffer with
  probability ``capacity / n_seen``.
* ``class_balanced`` -- an equal share of the capacity per class seen so far, filled with a
  uniform random subset of each class (as Avalanche's ``ClassBalancedBuffer``); the remainder
  of ``capacity / n_classes`` goes one slot each to the lowest class ids, and shares are
  re-balanced (old classes shrink) when new classes arrive.

The buffer is an ``nn.Module`` whose content travels in the strategy's ``state_dict`` (as
"extra state"), so a resumed run replays exactly the same samples.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from clpeft.data import DataView
from clpeft.experience import Experience

Policy = Literal["reservoir", "class_balanced"]


class ReplayBuffer(nn.Module):
    """A fixed-capacity memory of ``(experience index, position in its training view)`` pairs.

    Args:
        capacity: the most samples kept.
        policy: ``"reservoir"`` or ``"class_balanced"``.
    """

    def __init__(self, capacity: int, policy: Policy = "reservoir"):
        super().__init__()
        if capacity < 0:
            raise ValueError("capacity must be >= 0")
        if policy not in ("reservoir", "class_balanced"):
            raise ValueError(f"unknown replay policy {policy!r}")
        self.capacity = capacity
        self.policy = policy
        self.items = torch.empty(0, 2, dtype=torch.long)  # rows: (experience index, position)
        self.labels = torch.empty(0, dtype=torch.long)
        self.n_seen = 0

    def __len__(self) -> int:
        return len(self.items)

    def update(self, exp: Experience, generator: torch.Generator | None = None) -> None:
        """Offer every training sample of ``exp`` to the buffer."""
        labels = exp.train.targets
        items = torch.stack([torch.full((len(labels),), exp.index), torch.arange(len(labels))], dim=1)
        if self.policy == "reservoir":
            self._reservoir(items, labels, generator)
        else:
            self._class_balanced(items, labels, generator)

    def _reservoir(self, items, labels, generator) -> None:
        keep_items, keep_labels = list(self.items), list(self.labels)
        for row, label in zip(items, labels):
            self.n_seen += 1
            if len(keep_items) < self.capacity:
                keep_items.append(row)
                keep_labels.append(label)
                continue
            j = int(torch.randint(self.n_seen, (1,), generator=generator))
            if j < self.capacity:
                keep_items[j] = row
                keep_labels[j] = label
        self._set(keep_items, keep_labels)

    def _class_balanced(self, items, labels, generator) -> None:
        self.n_seen += len(labels)
        all_items = torch.cat([self.items, items])
        all_labels = torch.cat([self.labels, labels])
        classes = torch.unique(all_labels)
        base, extra = divmod(self.capacity, max(len(classes), 1))
        keep = []
        for rank, c in enumerate(classes.tolist()):
            share = base + (rank < extra)
            idx = torch.nonzero(all_labels == c).flatten()
            if len(idx) > share:
                idx = idx[torch.randperm(len(idx), generator=generator)[:share]].sort().values
            keep.append(idx)
        keep = torch.cat(keep) if keep else torch.empty(0, dtype=torch.long)
        self._set(list(all_items[keep]), list(all_labels[keep]))

    def _set(self, items, labels) -> None:
        self.items = torch.stack(items) if items else torch.empty(0, 2, dtype=torch.long)
        self.labels = torch.stack(labels) if labels else torch.empty(0, dtype=torch.long)

    def view(self, past: tuple[Experience, ...] | list[Experience]) -> DataView:
        """The stored samples as a view over the training data of ``past`` experiences."""
        by_index = {e.index: e for e in past}
        view = DataView([])
        for e_index in torch.unique(self.items[:, 0]).tolist():
            positions = self.items[self.items[:, 0] == e_index, 1]
            view = view + by_index[e_index].train.take(positions)
        return view

    def get_extra_state(self) -> dict:
        return {"items": self.items, "labels": self.labels, "n_seen": self.n_seen}

    def set_extra_state(self, state: dict) -> None:
        self.items, self.labels, self.n_seen = state["items"], state["labels"], state["n_seen"]

    def extra_repr(self) -> str:
        return f"capacity={self.capacity}, policy={self.policy}, stored={len(self)}"
