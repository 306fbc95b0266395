"""CMF's continual model fusion: a hidden model filtered towards the source, fused into the adapting one.

Lee et al., "Becoming a Foundation Model for Continual Test-Time Adaptation? Continual Model
Fusion" (CMF), ICLR 2024 (https://openreview.net/forum?id=BllUWdpIOA), as in the code of
Döbler et al.'s benchmark (``classification/methods/cmf.py``, ``bayesian_filtering``). After
every optimizer step, with the adapted weights ``theta``, the source's ``theta_0`` and a hidden
model ``h`` (the source at the start) of variance ``v`` (0 at the start):

1. predict: ``h <- alpha h + (1 - alpha) theta_0``, ``v <- alpha^2 v + q``;
2. update (a Kalman gain): ``beta = (1 - q) / (v + 1 - q)``, clipped below at 0.89 and set to 1
   from 0.9999 on; ``v <- beta v``; ``h <- beta h + (1 - beta) theta``;
3. fuse: ``theta <- gamma theta + (1 - gamma) h``.

``q`` is the configured process noise times the number of adapted weights over 38,400 (the
code's scaling). The code's ``CMF.TYPE: op`` fuses with the predicted hidden model, which is the
same object it has just updated, so both types compute the same: there is no such option here.
Only the adapted weights are ever blended (the code blends every weight of ``h``, whose other
weights stay the source's).
"""

from __future__ import annotations

import torch
from torch import nn

from clpeft.components.regularization.distillation import frozen_copy
from clpeft.components.tta.weight_ensembling import blend_

PARAMETER_SCALE = 38400  # the code's reference count of adapted weights for q
GAIN_FLOOR, GAIN_CEILING = 0.89, 0.9999


class ModelFusion(nn.Module):
    """The source and hidden models of CMF and its filter (see the module docstring).

    Args:
        model: the network that adapts (``classifier(backbone, head)``): the copies keep its
            ``state_dict`` keys from construction on; :meth:`capture` records the source.
        alpha: ``alpha``, how fast the hidden model returns to the source.
        gamma: ``gamma``, how much of the adapted weights the fusion keeps.
        q: process noise per 38,400 adapted weights.
    """

    def __init__(self, model: nn.Module, alpha: float = 0.99, gamma: float = 0.99, q: float = 0.005):
        super().__init__()
        self.alpha, self.gamma, self.q = alpha, gamma, q
        self.source = frozen_copy(model)
        self.hidden = frozen_copy(model)
        self.register_buffer("variance", torch.zeros((), dtype=torch.float64))
        self.beta = 1.0  # the last gain (for inspection)

    def capture(self, model: nn.Module) -> None:
        """Source and hidden model = ``model``'s current weights; variance 0."""
        self.source = frozen_copy(model)
        self.hidden = frozen_copy(model)
        self.variance.zero_()

    @torch.no_grad()
    def fuse(self, model: nn.Module, names: list[str]) -> None:
        """One filtering step and the fusion of ``model``'s adapted parameters ``names``."""
        params = dict(model.named_parameters())
        q = self.q * sum(params[n].numel() for n in names) / PARAMETER_SCALE
        blend_(self.hidden, self.source, self.alpha, names)
        variance = self.alpha**2 * float(self.variance) + q
        beta = max((1 - q) / (variance + 1 - q), GAIN_FLOOR)
        self.beta = beta if beta < GAIN_CEILING else 1.0
        self.variance.fill_(self.beta * variance)
        blend_(self.hidden, model, self.beta, names)
        blend_(model, self.hidden, self.gamma, names)
