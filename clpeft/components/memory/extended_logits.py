"""X-DER's memory: samples with logits that are rewritten as the model learns classes after them.

Boschini, Bonicelli, Buzzega, Porrello & Calderara, "Class-Incremental Continual Learning into the
eXtended DER-verse", TPAMI 2022 (https://arxiv.org/abs/2201.00766), Sec. 4. Unlike DER's
reservoir, the memory is filled at the end of each task: every old class keeps its first
``capacity // classes seen`` samples, and the free slots are shared equally by the new classes (the
remainder one slot each to randomly drawn classes), which take the first samples of a pass over
their data. Stored logits are then edited with :func:`update_logits`:

* a new sample's logits of the *past* classes are scaled down so none exceeds ``gamma`` times its
  own class's (the past is "rewritten" with what the model knows now);
* an old sample's logits of the classes learnt *after* it are filled in with the current model's
  (scaled the same way), at the end of every task and, during training, for the replayed old
  samples, the ``n``-th time a slot is replayed in a task with probability ``1 / n``.

Positions, labels and logits live in a :class:`~clpeft.components.memory.replay.ReplayBuffer` and a
:class:`~clpeft.components.memory.logits.LogitsStore` (both travel in the ``state_dict``), slot by
slot as Mammoth's ``Buffer`` (``tests/reference/test_mammoth_lucir_xder.py``).
"""

from __future__ import annotations

import torch
from torch import nn

from clpeft.components.memory.logits import LogitsStore
from clpeft.components.memory.replay import ReplayBuffer
from clpeft.experience import Experience


@torch.no_grad()
def update_logits(old: torch.Tensor, new: torch.Tensor, labels: torch.Tensor, start: int, stop: int, gamma: float) -> torch.Tensor:
    """``old`` with columns ``start:stop`` replaced by ``new``'s, each row's scaled by ``gamma *
    old[y] / max`` where their maximum exceeds ``old[y]``, the row's own class's logit (X-DER, eq. 7)."""
    old, transplant = old.clone(), new[:, start:stop].clone()
    own = old[torch.arange(len(labels)), labels]
    highest = transplant.max(dim=1).values
    exceeds = highest > own
    transplant[exceeds] *= (gamma * own / highest)[exceeds, None]
    old[:, start:stop] = transplant
    return old


class ExtendedLogitsMemory(nn.Module):
    """Positions, labels, logits and replay counts of X-DER's memory.

    Args:
        capacity: the number of slots.
    """

    def __init__(self, capacity: int):
        super().__init__()
        self.buffer = ReplayBuffer(capacity, "reservoir")  # only ever appended to below capacity
        self.logits = LogitsStore(capacity)
        self.register_buffer("replays", torch.zeros(capacity))  # times each slot was replayed in this task

    def __len__(self) -> int:
        return len(self.buffer)

    @property
    def labels(self) -> torch.Tensor:
        return self.buffer.labels

    def keep_first(self, per_class: int) -> None:
        """Every class keeps its first ``per_class`` slots; classes in ascending order, logits alongside."""
        labels = self.buffer.labels
        kept = torch.cat([torch.nonzero(labels == c).flatten()[:per_class] for c in torch.unique(labels).tolist()])
        values, widths = self.logits.values[kept].clone(), self.logits.widths[kept].clone()
        self.buffer.keep(kept)
        self.logits.values[: len(kept)], self.logits.widths[: len(kept)] = values, widths
        self.logits.widths[len(kept) :] = 0

    def quotas(self, n_classes: int) -> torch.Tensor:
        """Slots for each of ``n_classes`` new classes: the free slots shared equally, the remainder
        one each to randomly drawn classes (one ``torch.randperm`` draw)."""
        free = self.buffer.capacity - len(self)
        quota = torch.full((n_classes,), free // n_classes, dtype=torch.long)
        quota[torch.randperm(n_classes)[: free - quota.sum()]] += 1
        return quota

    def append(self, exp: Experience, positions: torch.Tensor, labels: torch.Tensor, logits: torch.Tensor) -> None:
        """Store samples of ``exp`` with their logits in the next free slots."""
        if len(self) + len(labels) > self.buffer.capacity:
            raise ValueError("append() fills free slots only")
        self.logits.write(self.buffer.add(exp, positions, labels), logits)

    def read(self, slots: torch.Tensor, width: int) -> torch.Tensor:
        """The stored logits of ``slots``, zero-padded (or cut) to ``width`` columns."""
        values, _ = self.logits.read(slots)
        return torch.nn.functional.pad(values, (0, max(0, width - values.shape[1])))[:, :width]

    def rewrite(self, slots: torch.Tensor, outputs: torch.Tensor, start: int, gamma: float) -> None:
        """Columns ``start:`` of the stored logits of ``slots`` become ``outputs``' (:func:`update_logits`)."""
        if len(slots):
            width = outputs.shape[1]
            stored = self.read(slots, width).to(outputs.device)
            self.logits.write(slots, update_logits(stored, outputs.float(), self.labels[slots].to(outputs.device), start, width, gamma))

    def replayed(self, slots: torch.Tensor, n_past: int) -> torch.Tensor:
        """Count a replay of the old-class slots among ``slots`` (distinct); returns those drawn for a
        rewrite, each with probability ``1 / (its replays in this task)`` (one ``torch.rand`` draw)."""
        old = slots[self.labels[slots] < n_past]
        self.replays[old] += 1
        return old[torch.rand(len(old)) * self.replays[old].cpu() < 1]
