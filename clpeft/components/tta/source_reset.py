"""Return an adapting model to its source state: SAR's model recovery and RDumb's periodic reset.

Niu et al., "Towards Stable Test-Time Adaptation in Dynamic Wild World", ICLR 2023
(https://arxiv.org/abs/2302.12400), section 4.2 (model recovery), and Press et al., "RDumb: A
simple approach that questions our progress in continual test-time adaptation", NeurIPS 2023
(https://arxiv.org/abs/2306.05401): both put the adapted weights back to the source model's and
start the optimizer afresh (Döbler et al.'s benchmark, ``TTAMethod.reset``: the model's
``state_dict`` and the optimizer's state saved before the first test batch). SAR's code restores
the optimizer state of its SAM wrapper only, whose base SGD keeps its momentum buffers: its
recovery resets the weights alone.
"""

from __future__ import annotations

import torch
from torch import nn

from clpeft.components.regularization.distillation import frozen_copy
from clpeft.components.tta.online_adaptation import AdaptationOptimizer


class SourceReset(nn.Module):
    """A frozen copy of the source model, and the reset of an adapting model to it.

    Args:
        model: the network that adapts (``classifier(backbone, head)``); its copy keeps the
            ``state_dict`` keys alike from construction on (a resumed run loads into it).

    :meth:`capture` records the source when adaptation starts (the weights at construction are
    not yet the source model's); the copy is part of the owner's ``state_dict``, so a resumed
    run resets to the same source.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.source = frozen_copy(model)

    def capture(self, model: nn.Module) -> None:
        """Record ``model``'s current weights as the source."""
        self.source = frozen_copy(model)

    @torch.no_grad()
    def restore(self, model: nn.Module, optimizer: AdaptationOptimizer | None = None) -> None:
        """Load the source weights into ``model`` and, if given, clear ``optimizer``'s state
        (moments, step count)."""
        model.load_state_dict(self.source.state_dict())
        if optimizer is not None:
            optimizer.set_extra_state({"optimizer": None})
