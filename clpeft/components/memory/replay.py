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
* ``herding`` -- iCaRL's exemplar memory (Rebuffi et al., "iCaRL: Incremental Classifier and
  Representation Learning", CVPR 2017, https://arxiv.org/abs/1611.07725): ``m = capacity //
  n_classes`` exemplars per class seen so far. A new class's exemplars are chosen by herding
  (:func:`herding_order`, Alg. 4) on the features of its training samples and stored in
  selection order; an old class keeps the first ``m`` of its list (Alg. 5,
  ReduceExemplarSet). The features come from the caller (the model after training on the
  experience), so the component never runs a model.

Whole experiences are offered with :meth:`ReplayBuffer.update` (after training on them); single
batches with :meth:`ReplayBuffer.add` (reservoir sampling over the stream as it is trained on,
as ER, ER-ACE and DER do), and :meth:`ReplayBuffer.sample` draws a random mini-batch of the
memory as a view (:meth:`ReplayBuffer.draw` and :meth:`ReplayBuffer.at` the same in two steps,
keeping the slots, for what is stored beside the samples: DER's logits).

The buffer is an ``nn.Module`` whose content travels in the strategy's ``state_dict`` (as
"extra state"), so a resumed run replays exactly the same samples.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from clpeft.data import DataView
from clpeft.experience import Experience

Policy = Literal["reservoir", "class_balanced", "herding"]
POLICIES = ("reservoir", "class_balanced", "herding")
#: Added to a feature's norm before dividing (PILOT's ``EPSILON`` in ``models/base.py``).
NORM_EPSILON = 1e-8


def herding_order(features: torch.Tensor, m: int) -> torch.Tensor:
    """The first ``min(m, N)`` exemplars chosen by herding, in the order they are chosen.

    iCaRL, Alg. 4: with ``phi`` the L2-normalised features of one class and ``mu`` their mean,
    exemplar ``k`` is ``argmin_x || mu - (phi(x) + sum_{j<k} phi(p_j)) / k ||`` over the samples
    not chosen yet (the first one on ties). Normalisation ``phi / (||phi|| + 1e-8)`` and the
    un-renormalised class mean follow LAMDA-PILOT's ``_construct_exemplar`` (PyCIL); Mammoth's
    ``fill_buffer`` makes the same choices when it normalises the features
    (``normalize_features=True``, as its iCaRL calls it), not as its LUCIR calls it (herding on
    un-normalised features). Computed in float64.

    Args:
        features: ``(N, D)`` features of one class's samples.
        m: how many exemplars to choose.

    Returns:
        ``(min(m, N),)`` row indices into ``features``.
    """
    x = features.detach().to(torch.float64)
    x = x / (x.norm(dim=1, keepdim=True) + NORM_EPSILON)
    mean = x.mean(dim=0)
    chosen = torch.zeros(len(x), dtype=torch.bool)
    total = torch.zeros_like(mean)
    order = []
    for k in range(1, min(m, len(x)) + 1):
        cost = (mean - (total + x) / k).norm(dim=1).masked_fill(chosen, float("inf"))
        i = int(cost.argmin())
        order.append(i)
        chosen[i] = True
        total += x[i]
    return torch.tensor(order, dtype=torch.long)


class ReplayBuffer(nn.Module):
    """A fixed-capacity memory of ``(experience index, position in its training view)`` pairs.

    Args:
        capacity: the most samples kept.
        policy: ``"reservoir"``, ``"class_balanced"`` or ``"herding"``.
    """

    def __init__(self, capacity: int, policy: Policy = "reservoir"):
        super().__init__()
        if capacity < 0:
            raise ValueError("capacity must be >= 0")
        if policy not in POLICIES:
            raise ValueError(f"unknown replay policy {policy!r}")
        self.capacity = capacity
        self.policy = policy
        self.items = torch.empty(0, 2, dtype=torch.long)  # rows: (experience index, position)
        self.labels = torch.empty(0, dtype=torch.long)
        self.n_seen = 0

    def __len__(self) -> int:
        return len(self.items)

    def update(self, exp: Experience, generator: torch.Generator | None = None, features: torch.Tensor | None = None) -> None:
        """Offer every training sample of ``exp`` to the buffer.

        Args:
            exp: the experience just trained on.
            generator: the random draws of ``reservoir`` and ``class_balanced``.
            features: ``herding`` only (required there): ``(N, D)`` features of ``exp.train``'s
                samples, in the view's order.
        """
        labels = exp.train.targets
        items = torch.stack([torch.full((len(labels),), exp.index), torch.arange(len(labels))], dim=1)
        if self.policy == "reservoir":
            self._reservoir(items, labels, generator)
        elif self.policy == "class_balanced":
            self._class_balanced(items, labels, generator)
        else:
            if features is None or len(features) != len(labels):
                raise ValueError(f"herding needs the features of the experience's {len(labels)} training samples")
            self._herding(items, labels, features.cpu())

    def add(self, exp: Experience, positions: torch.Tensor, labels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Offer one batch of ``exp``'s training samples (``batch.index``, ``batch.y``) by reservoir sampling.

        Every sample offered so far stays in the memory with probability ``capacity / n_seen``
        (a sample offered again in a later epoch counts again, as in Mammoth's buffer).

        Returns:
            for each offered sample, the slot it was written to, or -1 (what travels with a
            sample, such as DER's logits, is stored at the same slot; a later sample of the
            batch may overwrite an earlier one's slot).
        """
        if self.policy != "reservoir":
            raise ValueError(f"add() samples a stream by reservoir; a {self.policy} buffer is filled with update()")
        positions, labels = positions.detach().cpu().long(), labels.detach().cpu().long()
        items = torch.stack([torch.full_like(positions, exp.index), positions], dim=1)
        return self._reservoir(items, labels, generator)

    def sample(self, n: int, past: tuple[Experience, ...] | list[Experience], generator: torch.Generator | None = None) -> DataView:
        """``min(n, len(self))`` stored samples drawn uniformly without replacement, as a view over
        the training data of ``past`` (include the current experience when it may hold them)."""
        return self._view_of(self.items[self.draw(n, generator)], past)

    def draw(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``min(n, len(self))`` distinct slots drawn uniformly: the draw :meth:`sample` makes."""
        return torch.randperm(len(self), generator=generator)[: min(n, len(self))]

    def at(self, slots: torch.Tensor, past: tuple[Experience, ...] | list[Experience]) -> DataView:
        """The samples stored in ``slots``, in that order, as a view over the training data of ``past``."""
        by_index = {e.index: e for e in past}
        view = DataView([])
        for e_index, position in self.items[slots].tolist():
            view = view + by_index[e_index].train.take([position])
        return view

    def _reservoir(self, items, labels, generator) -> torch.Tensor:
        keep_items, keep_labels = list(self.items), list(self.labels)
        slots = torch.full((len(items),), -1, dtype=torch.long)
        for i, (row, label) in enumerate(zip(items, labels)):
            self.n_seen += 1
            if len(keep_items) < self.capacity:
                slots[i] = len(keep_items)
                keep_items.append(row)
                keep_labels.append(label)
                continue
            j = int(torch.randint(self.n_seen, (1,), generator=generator))
            if j < self.capacity:
                slots[i] = j
                keep_items[j] = row
                keep_labels[j] = label
        self._set(keep_items, keep_labels)
        return slots

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

    def _herding(self, items, labels, features) -> None:
        self.n_seen += len(labels)
        new_classes = torch.unique(labels)
        old = ~torch.isin(self.labels, new_classes)  # a class met again is selected afresh
        classes = torch.unique(torch.cat([self.labels[old], new_classes]))
        m = self.capacity // max(len(classes), 1)
        new, keep = set(new_classes.tolist()), []
        for c in classes.tolist():
            if c in new:
                idx = torch.nonzero(labels == c).flatten()
                chosen = idx[herding_order(features[idx], m)]
                keep.append((items[chosen], labels[chosen]))
            else:  # stored in selection order: the first m are the best m
                chosen = torch.nonzero(self.labels == c).flatten()[:m]
                keep.append((self.items[chosen], self.labels[chosen]))
        self._set([r for rows, _ in keep for r in rows], [y for _, ys in keep for y in ys])

    def keep(self, slots: torch.Tensor) -> None:
        """Keep only the samples at ``slots``, in that order, and count only them as seen (so
        reservoir sampling fills the freed slots before it replaces any)."""
        self.items, self.labels, self.n_seen = self.items[slots], self.labels[slots], len(slots)

    def _set(self, items, labels) -> None:
        self.items = torch.stack(items) if items else torch.empty(0, 2, dtype=torch.long)
        self.labels = torch.stack(labels) if labels else torch.empty(0, dtype=torch.long)

    def view(self, past: tuple[Experience, ...] | list[Experience]) -> DataView:
        """The stored samples as a view over the training data of ``past`` experiences."""
        return self._view_of(self.items, past)

    @staticmethod
    def _view_of(items: torch.Tensor, past) -> DataView:
        by_index = {e.index: e for e in past}
        view = DataView([])
        for e_index in torch.unique(items[:, 0]).tolist():
            view = view + by_index[e_index].train.take(items[items[:, 0] == e_index, 1])
        return view

    def get_extra_state(self) -> dict:
        return {"items": self.items, "labels": self.labels, "n_seen": self.n_seen}

    def set_extra_state(self, state: dict) -> None:
        self.items, self.labels, self.n_seen = state["items"], state["labels"], state["n_seen"]

    def extra_repr(self) -> str:
        return f"capacity={self.capacity}, policy={self.policy}, stored={len(self)}"
