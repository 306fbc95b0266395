"""Robust batch normalisation (RoTTA): test statistics as an exponential moving average.

Yuan et al., "Robust Test-Time Adaptation in Dynamic Scenarios", CVPR 2023
(https://arxiv.org/abs/2303.13899), section 3.2, eq. 3: each BatchNorm layer keeps global
statistics that start at the source's and follow the batches the method trains on,

    mu <- (1 - alpha) mu + alpha mu_B,     sigma^2 <- (1 - alpha) sigma^2 + alpha sigma_B^2

(biased batch variance), normalising those batches with the updated values (the gradient flows
through ``mu_B, sigma_B^2``) and every other batch (predictions) with the stored ones. As the
authors' code (``RobustBN2d`` in Döbler et al.'s benchmark, ``methods/rotta.py``) the statistics
live in the layers' running buffers here, so the ``state_dict`` keys are the source model's.
Each (eval-mode) layer's ``forward`` is replaced on the instance
(:class:`~clpeft.components.tta.replaced_batch_norm.ReplacedBatchNorm`);
:meth:`RobustBatchNorm.updating` marks the forwards that update.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from clpeft.components.tta.replaced_batch_norm import ReplacedBatchNorm


class RobustBatchNorm(ReplacedBatchNorm):
    """RoTTA's moving-average BatchNorm on the layers given to :meth:`attach`.

    A deep copy of a model with attached layers (a strategy copied whole) carries its own copy of
    this object: it updates inside its copy's :meth:`updating` blocks, not this one's. RoTTA
    attaches the student's and the teacher's layers together after any copy.

    Args:
        alpha: momentum of the statistics (0.05 in RoTTA).
    """

    def __init__(self, alpha: float):
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
        super().__init__()
        self.alpha = float(alpha)
        self._updating = False

    @contextlib.contextmanager
    def updating(self):
        """Forwards inside this block update the statistics with their batch and use them."""
        self._updating = True
        try:
            yield
        finally:
            self._updating = False

    def _normalise(self, layer: _BatchNorm, x: torch.Tensor) -> torch.Tensor:
        layer._check_input_dim(x)
        if not self._updating:
            return F.batch_norm(x, layer.running_mean, layer.running_var, layer.weight, layer.bias, False, 0.0, layer.eps)
        shape = (1, -1) + (1,) * (x.dim() - 2)
        var, mean = torch.var_mean(x, dim=[0, *range(2, x.dim())], unbiased=False)
        mean = (1 - self.alpha) * layer.running_mean + self.alpha * mean
        var = (1 - self.alpha) * layer.running_var + self.alpha * var
        with torch.no_grad():
            layer.running_mean.copy_(mean)
            layer.running_var.copy_(var)
        out = (x - mean.view(shape)) / torch.sqrt(var.view(shape) + layer.eps)
        if layer.affine:
            out = out * layer.weight.view(shape) + layer.bias.view(shape)
        return out


def batch_norm_layers_of(model: nn.Module) -> list[_BatchNorm]:
    """``model``'s BatchNorm1d/2d layers (those RoTTA replaces)."""
    return [m for m in model.modules() if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d))]
