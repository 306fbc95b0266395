"""BiC's bias correction layer: a two-parameter affine map of the newest classes' logits.

Wu et al., "Large Scale Incremental Learning", CVPR 2019 (https://arxiv.org/abs/1905.13260), eq. 4:
``q_k = o_k`` for the old classes and ``q_k = alpha o_k + beta`` for the classes of the latest
experience. ``alpha`` and ``beta`` start at 1 and 0 and are fitted, with everything else frozen, by
minimising the cross-entropy of the corrected logits on a small validation set balanced between old
and new classes (eq. 5), with Adam at ``lr = 1e-3`` as Mammoth's ``models/bic.py``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn


class BiasCorrection(nn.Module):
    """``alpha`` and ``beta`` for the logits ``start:end`` (the identity until fitted); a buffer state."""

    def __init__(self):
        super().__init__()
        self.register_buffer("alpha", torch.ones(()))
        self.register_buffer("beta", torch.zeros(()))
        self.start = self.end = 0

    def forward(self, logits: torch.Tensor) -> torch.Tensor:
        """The corrected logits (a new tensor; columns outside ``start:end`` unchanged)."""
        corrected = logits.clone()
        new = corrected[:, self.start : self.end]
        corrected[:, self.start : self.end] = self.alpha.to(new.dtype) * new + self.beta.to(new.dtype)
        return corrected

    def fit(
        self, batches: Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]], start: int, end: int, epochs: int, lr: float = 1e-3
    ) -> None:
        """Fit ``alpha, beta`` for the logits ``start:end`` on ``epochs`` passes over ``batches()``.

        Args:
            batches: each call gives one epoch of ``(logits, labels)`` of the validation set, the
                logits over the ``end`` classes seen so far, uncorrected.
            start: first class of the latest experience.
            end: classes seen so far.
            epochs: passes over the validation set.
            lr: Adam's learning rate.
        """
        factors = torch.tensor([0.0, 1.0], device=self.alpha.device, requires_grad=True)  # beta, alpha
        optimizer = torch.optim.Adam([factors], lr=lr)
        self.start, self.end = start, end
        with torch.enable_grad():
            for _ in range(epochs):
                for logits, labels in batches():
                    corrected = logits[:, :end].detach().clone()
                    corrected[:, start:end] *= factors[1]
                    corrected[:, start:end] += factors[0]
                    optimizer.zero_grad()
                    F.cross_entropy(corrected, labels).backward()
                    optimizer.step()
        self.beta.copy_(factors[0].detach())
        self.alpha.copy_(factors[1].detach())

    def get_extra_state(self) -> dict:
        return {"start": self.start, "end": self.end}

    def set_extra_state(self, state: dict) -> None:
        self.start, self.end = state["start"], state["end"]

    def extra_repr(self) -> str:
        return f"classes {self.start}:{self.end}, alpha={float(self.alpha):.4f}, beta={float(self.beta):.4f}"
