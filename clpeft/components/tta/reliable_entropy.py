"""EATA's reliable, non-redundant entropy minimisation as one component, shared by EATA and RDumb.

Niu et al., "Efficient Test-Time Model Adaptation without Forgetting", ICML 2022
(https://arxiv.org/abs/2204.02610), eq. 6-8 (ETA): the entropy of the samples whose entropy is
below ``E_0 = entropy_factor * ln C`` and whose prediction differs from the moving average
(``|cos| < epsilon``), each weighted by ``1 / exp(H - E_0)``. RDumb (Press et al., NeurIPS 2023)
minimises the same loss between its resets.
"""

from __future__ import annotations

import math

import torch
from pydantic import Field

from clpeft.components.tta.losses import EATASampleFilter, entropy
from clpeft.schema import Options


class ReliableEntropyOptions(Options):
    """ETA's sample filter: the entropy margin and the redundancy margin."""

    entropy_factor: float = Field(0.4, gt=0, description="``E_0 = entropy_factor * ln C``.")
    redundancy_margin: float = Field(0.4, ge=0, description="``epsilon`` of the cosine-similarity filter.")


def entropy_margin(factor: float, n_classes: int) -> float:
    """``factor * ln C`` (``C`` at least 2): EATA's ``E_0``, and the entropy margins of SAR and DeYO."""
    return factor * math.log(max(n_classes, 2))


class ReliableEntropy(EATASampleFilter):
    """ETA's loss: an :class:`~clpeft.components.tta.losses.EATASampleFilter` whose ``E_0`` follows the class count.

    Args:
        options: :class:`ReliableEntropyOptions`.
    """

    def __init__(self, options: ReliableEntropyOptions):
        super().__init__(0.0, options.redundancy_margin)
        self.entropy_factor = options.entropy_factor

    def start(self, n_classes: int) -> None:
        """Set ``E_0`` for an experience whose head has ``n_classes`` outputs."""
        self.entropy_margin = entropy_margin(self.entropy_factor, n_classes)

    def loss(self, logits: torch.Tensor) -> torch.Tensor | None:
        """Eq. 8: the weighted mean entropy of the selected samples (updates ``m``); ``None`` when none is selected."""
        selected, weights = self.select(logits.detach())
        if not selected.any():
            return None
        return (entropy(logits[selected]) * weights[selected]).mean()
