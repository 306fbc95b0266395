"""Robust batch normalisation (RoTTA): test statistics as an exponential moving average.

Yuan et al., "Robust Test-Time Adaptation in Dynamic Scenarios", CVPR 2023
(https://arxiv.org/abs/2303.13899), section 3.2, eq. 3: each BatchNorm layer keeps global
statistics that start at the source's and follow the batches the method trains on,

    mu <- (1 - alpha) mu + alpha mu_B,     sigma^2 <- (1 - alpha) sigma^2 + alpha sigma_B^2

(biased batch variance), normalising those batches with the updated values (the gradient flows
through ``mu_B, sigma_B^2``) and every other batch (predictions) with the stored ones. As the
authors' code (``RobustBN2d`` in Döbler et al.'s benchmark, ``methods/rotta.py``) the statistics
live in the layers' running buffers here, so the ``state_dict`` keys are the source model's;
a forward hook replaces each (eval-mode) layer's output, and :meth:`RobustBatchNorm.updating`
marks the forwards that update.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


class RobustBatchNorm:
    """RoTTA's moving-average BatchNorm on the layers given to :meth:`attach`.

    Args:
        alpha: momentum of the statistics (0.05 in RoTTA).
    """

    def __init__(self, alpha: float):
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
        self.alpha = float(alpha)
        self._updating = False
        self._handles: list = []

    def attach(self, layers: list[_BatchNorm]) -> None:
        """Apply to ``layers`` (eval mode; replaces a previous :meth:`attach`, and any hook of
        this kind a layer carries from being copied)."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        for layer in layers:
            for key, hook in list(layer._forward_hooks.items()):
                if isinstance(getattr(hook, "__self__", None), RobustBatchNorm):
                    del layer._forward_hooks[key]
            layer.eval()
            self._handles.append(layer.register_forward_hook(self._normalise))

    @contextlib.contextmanager
    def updating(self):
        """Forwards inside this block update the statistics with their batch and use them."""
        self._updating = True
        try:
            yield
        finally:
            self._updating = False

    def _normalise(self, layer: _BatchNorm, inputs: tuple[torch.Tensor, ...], _output: torch.Tensor) -> torch.Tensor:
        x = inputs[0]
        shape = (1, -1) + (1,) * (x.dim() - 2)
        if self._updating:
            var, mean = torch.var_mean(x, dim=[0, *range(2, x.dim())], unbiased=False)
            mean = (1 - self.alpha) * layer.running_mean + self.alpha * mean
            var = (1 - self.alpha) * layer.running_var + self.alpha * var
            with torch.no_grad():
                layer.running_mean.copy_(mean)
                layer.running_var.copy_(var)
        else:
            mean, var = layer.running_mean, layer.running_var
        out = (x - mean.view(shape)) / torch.sqrt(var.view(shape) + layer.eps)
        return out * layer.weight.view(shape) + layer.bias.view(shape)


def batch_norm_layers_of(model: nn.Module) -> list[_BatchNorm]:
    """``model``'s BatchNorm1d/2d layers (those RoTTA replaces)."""
    return [m for m in model.modules() if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d))]
