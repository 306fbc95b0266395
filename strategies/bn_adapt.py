"""Test-time batch normalisation: normalise with the statistics of the test batches.

Schneider et al., "Improving robustness against common corruptions by covariate shift
adaptation", NeurIPS 2020 (https://arxiv.org/abs/2006.16971), and Nado et al., "Evaluating
Prediction-Time Batch Normalization for Robustness under Covariate Shift", 2020
(https://arxiv.org/abs/2006.10963). Every BatchNorm layer computes

    y = gamma * (x - mu) / sqrt(sigma^2 + eps) + beta

with, by ``statistics`` (the benchmark of Döbler et al.'s ``norm_test``, ``norm_alpha`` and
``norm_ema``, ``methods/norm.py``):

* ``batch``: the mean ``mu_B`` and (biased) variance ``sigma_B^2`` of the current test batch
  (Schneider et al.'s ``N = 0``, no source prior); the running statistics are left untouched;
* ``alpha``: the source statistics with the batch's as a prior, ``(1 - alpha) mu_s + alpha mu_B``
  and likewise the variance (unbiased), Schneider et al.'s eq. 3 (:class:`PriorBatchNorm`; the
  benchmark's ``BN.ALPHA`` 0.1 with test batches of one image);
* ``ema``: the running statistics, first updated with the test batch at each layer's own
  momentum (``r <- (1 - m) r + m s_B``, ``m = 0.1`` for torch's default; unbiased variance): a
  moving average over the stream that starts from the source statistics.

No parameter changes.
"""

from typing import Annotated, Literal

import torch
from pydantic import Field

from clpeft.components.tta.online_adaptation import OnlineAdaptation, batch_norm_layers, classifier
from clpeft.components.tta.prior_batch_norm import PriorBatchNorm, batch_norm_2d_layers
from clpeft.experience import Experience
from clpeft.registry import register_strategy
from clpeft.strategy import Strategy


@register_strategy("bn_adapt")
class BNAdapt(Strategy):
    """Test-batch BatchNorm statistics, no parameter update (Schneider et al. 2020; Nado et al. 2020).

    Args:
        backbone: a feature extractor with BatchNorm layers.
        statistics: ``batch`` (each test batch's), ``alpha`` (source statistics with the batch's
            as a prior) or ``ema`` (running statistics updated by every test batch).
        alpha: weight of the batch statistics with ``statistics: alpha``.
    """

    supported_scenarios = ("test_time_adaptation",)
    cache_features = False

    def __init__(self, backbone, statistics: Literal["batch", "alpha", "ema"] = "batch", alpha: Annotated[float, Field(ge=0, le=1)] = 0.1):
        super().__init__(backbone)
        self.statistics = statistics
        self.adaptation = OnlineAdaptation(None, batch_statistics=statistics == "batch")
        self.prior = PriorBatchNorm(alpha)

    def before_experience(self, exp: Experience) -> None:
        super().before_experience(exp)
        if exp.train is None:
            net = classifier(self.backbone, self.head)
            self.adaptation.prepare(self, net)
            if self.statistics == "alpha":
                self.prior.attach(batch_norm_2d_layers(net))

    def adapt(self, x: torch.Tensor) -> torch.Tensor:
        self.adaptation.begin_batch(self)
        with torch.no_grad():
            if self.statistics == "ema":
                layers = batch_norm_layers(classifier(self.backbone, self.head))
                for layer in layers:
                    layer.train()
                self.predict(x)
                for layer in layers:
                    layer.eval()
            return self.predict(x)
