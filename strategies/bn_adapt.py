"""Test-time batch normalisation: normalise with the statistics of each test batch.

Schneider et al., "Improving robustness against common corruptions by covariate shift
adaptation", NeurIPS 2020 (https://arxiv.org/abs/2006.16971), and Nado et al., "Evaluating
Prediction-Time Batch Normalization for Robustness under Covariate Shift", 2020
(https://arxiv.org/abs/2006.10963). Every BatchNorm layer computes

    y = gamma * (x - mu_B) / sqrt(sigma_B^2 + eps) + beta

with the mean ``mu_B`` and (biased) variance ``sigma_B^2`` of the current test batch instead of
the source running statistics (Schneider et al.'s ``N = 0``, no source prior). No parameter
changes; the running statistics are left untouched.
"""

import torch

from clpeft.components.tta.online_adaptation import OnlineAdaptation, classifier
from clpeft.experience import Experience
from clpeft.registry import register_strategy
from clpeft.strategy import Strategy


@register_strategy("bn_adapt")
class BNAdapt(Strategy):
    """Test-batch BatchNorm statistics, no parameter update (Schneider et al. 2020; Nado et al. 2020).

    Args:
        backbone: a feature extractor with BatchNorm layers.
    """

    supported_scenarios = ("test_time_adaptation",)
    cache_features = False

    def __init__(self, backbone):
        super().__init__(backbone)
        self.adaptation = OnlineAdaptation(None)

    def before_experience(self, exp: Experience) -> None:
        super().before_experience(exp)
        if exp.train is None:
            self.adaptation.prepare(self, classifier(self.backbone, self.head))

    def adapt(self, x: torch.Tensor) -> torch.Tensor:
        self.adaptation.begin_batch(self)
        with torch.no_grad():
            return self.predict(x)
