"""BatchNorm with the source statistics as a prior on the test statistics.

Schneider et al., "Improving robustness against common corruptions by covariate shift
adaptation", NeurIPS 2020 (https://arxiv.org/abs/2006.16971), eq. 3: every BatchNorm layer
normalises with

    mu = (1 - alpha) mu_s + alpha mu_t,     sigma^2 = (1 - alpha) sigma_s^2 + alpha sigma_t^2,

``mu_s, sigma_s^2`` the source running statistics, ``mu_t, sigma_t^2`` those of the current batch
(``alpha = n / (N + n)`` in the paper; MEMO, Zhang et al. 2022, uses ``alpha = 0.1``). As the
benchmark's ``AlphaBatchNorm`` (Döbler et al., ``methods/bn.py``, from the authors' robusta
code): the batch variance is the unbiased one (a BatchNorm's running variance after one update
with momentum 1), and the mixed statistics are constants for the gradient.

Each layer's ``forward`` is replaced on the instance
(:class:`~clpeft.components.tta.replaced_batch_norm.ReplacedBatchNorm`). The batch statistics come from ``torch.batch_norm_update_stats`` (BatchNorm's statistics kernel
without the normalised output; bit-identical to a BatchNorm update with momentum 1).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from clpeft.components.tta.replaced_batch_norm import ReplacedBatchNorm


class PriorBatchNorm(ReplacedBatchNorm):
    """Mix each BatchNorm layer's source statistics with the batch's (weight ``alpha`` on the batch).

    Args:
        alpha: weight of the test-batch statistics, in [0, 1] (0: source statistics, 1: the
            batch's, with the unbiased variance).
    """

    def __init__(self, alpha: float):
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must lie in [0, 1], got {alpha}")
        super().__init__()
        self.alpha = float(alpha)

    def _check(self, layers: list[_BatchNorm]) -> None:
        for layer in layers:
            if layer.running_mean is None:
                raise ValueError("prior BatchNorm needs the layers' source running statistics")

    def _normalise(self, layer: _BatchNorm, x: torch.Tensor) -> torch.Tensor:
        layer._check_input_dim(x)
        with torch.no_grad():
            # the batch's mean and unbiased variance: the running statistics after one update with momentum 1
            # (on a CPU ~3x faster than Tensor.var_mean, ~10% faster than F.batch_norm, which also normalises)
            mean, var = torch.zeros_like(layer.running_mean), torch.ones_like(layer.running_var)
            torch.batch_norm_update_stats(x, mean, var, 1.0)
            mixed_mean = (1 - self.alpha) * layer.running_mean + self.alpha * mean
            mixed_var = (1 - self.alpha) * layer.running_var + self.alpha * var
        return F.batch_norm(x, mixed_mean, mixed_var, layer.weight, layer.bias, False, 0.0, layer.eps)


def batch_norm_2d_layers(model: nn.Module) -> list[nn.BatchNorm2d]:
    """The ``BatchNorm2d`` layers of ``model`` (the ones ``AlphaBatchNorm`` replaces)."""
    return [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
