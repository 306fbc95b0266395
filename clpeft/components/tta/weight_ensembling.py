"""Weight ensembling of an adapting model with another model's weights (ROID, CMF).

Marsden et al., "Universal Test-time Adaptation through Weight Ensembling, Diversity Weighting,
and Prior Correction", WACV 2024 (https://arxiv.org/abs/2306.00650), eq. 9: after every update
the adapted weights move towards the source model's, ``theta <- alpha theta + (1 - alpha) theta_0``;
Lee et al., "Becoming a Foundation Model for Continual Test-Time Adaptation? Continual Model
Fusion" (CMF), ICLR 2024, blend three models the same way. The benchmark's
``utils/misc.py:ema_update_model`` computes ``m * a + (1 - m) * b`` per tensor (a momentum of 1
leaves ``a`` as it is).
"""

from __future__ import annotations

import torch
from torch import nn

from clpeft.components.tta.source_reset import SourceReset


def adapted_names(model: nn.Module) -> list[str]:
    """Names of ``model``'s parameters that adapt (require gradients), in order."""
    return [n for n, p in model.named_parameters() if p.requires_grad]


@torch.no_grad()
def blend_(target: nn.Module, other: nn.Module, momentum: float, names: list[str]) -> None:
    """``target.p <- momentum * target.p + (1 - momentum) * other.p`` for the parameters ``names``."""
    if momentum >= 1.0:
        return
    mine, theirs = dict(target.named_parameters()), dict(other.named_parameters())
    for name in names:
        p = mine[name]
        p.copy_(momentum * p + (1 - momentum) * theirs[name].to(p.device))


class SourceEnsemble(SourceReset):
    """ROID's weight ensembling (eq. 9): after every step the adapted weights move towards the
    source's, ``theta <- alpha theta + (1 - alpha) theta_0``.

    Args:
        model: the network that adapts; :meth:`capture` records the source when adaptation starts.
        momentum: ``alpha`` (1: no ensembling).
    """

    def __init__(self, model: nn.Module, momentum: float = 0.99):
        super().__init__(model)
        self.momentum = momentum

    def fuse(self, model: nn.Module, names: list[str]) -> None:
        """Blend ``model``'s parameters ``names`` with the source's."""
        blend_(model, self.source, self.momentum, names)
