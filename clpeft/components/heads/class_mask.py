"""The training-time class mask of the official prompt-method code.

``train_mask`` in google-research/l2p and JH-LEE-KR's L2P/DualPrompt ports; CODA-Prompt masks the
previous tasks' classes, the same set for a head grown to the classes seen so far. While training
on an experience, logits of classes outside it are set to ``-inf`` before the cross-entropy, so
only the current classes' head rows receive gradient. SLCA, LAE, InfLoRA (``lora_cl``) and
``merge_cl`` use it as well.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


class ClassMask:
    """Cross-entropy restricted to the current experience's classes (the official ``train_mask``).

    Args:
        enabled: ``False`` trains on all logits (plain cross-entropy).
    """

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.classes: list[int] = []

    def start(self, classes: Sequence[int]) -> None:
        """The classes of the experience about to be trained."""
        self.classes = list(classes)

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """``logits`` with every class outside the current ones set to ``-inf`` (when enabled)."""
        if not (self.enabled and self.classes):
            return logits
        outside = torch.ones(logits.shape[1], dtype=torch.bool, device=logits.device)
        outside[self.classes] = False
        return logits.masked_fill(outside, float("-inf"))

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of the masked logits."""
        return F.cross_entropy(self.apply(logits), targets)
