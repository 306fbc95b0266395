"""Logits kept beside a replay buffer's samples, slot by slot: Dark Experience Replay's memory.

Buzzega et al., "Dark Experience for General Continual Learning: a Strong, Simple Baseline",
NeurIPS 2020 (https://arxiv.org/abs/2004.07211): each sample the reservoir keeps is stored with
the network's logits ``z = h_theta(x)`` at the time it was seen (eq. 4), and replay matches the
current logits to them (eq. 5). :class:`~clpeft.components.memory.replay.ReplayBuffer.add`
returns the slot each sample went to; :meth:`LogitsStore.write` stores the logits there.

The head of a class-incremental learner grows, so a sample stored during an early experience has
fewer logits than the head has now: :meth:`LogitsStore.mse` compares only the logits each sample
was stored with. Mammoth's backbones have every class's output from the start, so they also pull
the outputs of classes not seen yet towards their stored (untrained) values; with a head as wide
as the stored logits both are the same mean squared error.
"""

from __future__ import annotations

import torch
from torch import nn


class LogitsStore(nn.Module):
    """Per-slot logits of variable width (the head grows); the content travels as extra state.

    Args:
        capacity: the number of slots (the replay buffer's capacity).
    """

    def __init__(self, capacity: int):
        super().__init__()
        self.values = torch.zeros(capacity, 0)
        self.widths = torch.zeros(capacity, dtype=torch.long)

    def write(self, slots: torch.Tensor, logits: torch.Tensor) -> None:
        """Store row ``i`` of ``logits`` at ``slots[i]``; a slot of -1 stores nothing, and when a slot
        repeats the last row wins (as sequential reservoir writes)."""
        logits = logits.detach().float().cpu()
        if logits.shape[1] > self.values.shape[1]:
            pad = torch.zeros(len(self.values), logits.shape[1] - self.values.shape[1])
            self.values = torch.cat([self.values, pad], dim=1)
        for row, slot in enumerate(slots.tolist()):
            if slot >= 0:
                self.values[slot] = 0.0
                self.values[slot, : logits.shape[1]] = logits[row]
                self.widths[slot] = logits.shape[1]

    def read(self, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logits, mask)`` of ``slots``: zero-padded to the widest stored row, ``mask`` true where stored."""
        values = self.values[slots]
        mask = torch.arange(values.shape[1]) < self.widths[slots, None]
        return values, mask

    def mse(self, slots: torch.Tensor, outputs: torch.Tensor) -> torch.Tensor:
        """Mean squared error between ``outputs`` (the current logits of the samples in ``slots``)
        and the stored logits, over the logits each sample was stored with (DER, eq. 5)."""
        values, mask = self.read(slots)
        values, mask = values.to(outputs.device), mask.to(outputs.device)
        width = values.shape[1]
        squared = (outputs[:, :width].float() - values).pow(2) * mask
        return squared.sum() / mask.sum().clamp(min=1)

    def get_extra_state(self) -> dict:
        return {"values": self.values, "widths": self.widths}

    def set_extra_state(self, state: dict) -> None:
        self.values, self.widths = state["values"], state["widths"]

    def extra_repr(self) -> str:
        return f"capacity={len(self.widths)}, width={self.values.shape[1]}"
