"""The unadapted source model: the reference every test-time adaptation method must beat.

Wang et al., "Tent: Fully Test-Time Adaptation by Entropy Minimization", ICLR 2021
(https://arxiv.org/abs/2006.10726), table 2 "source": the model trained on the source data
predicts the test stream with its training-time (running) normalisation statistics and no
update of any kind.
"""

import torch

from clpeft.registry import register_strategy
from clpeft.strategy import Strategy


@register_strategy("source")
class Source(Strategy):
    """No test-time adaptation: the source model as trained (baseline of Wang et al. 2021).

    Args:
        backbone: the feature extractor (trained on the source data by the engine).
    """

    supported_scenarios = ("test_time_adaptation",)
    cache_features = False

    def adapt(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.eval()
        with torch.no_grad():
            return self.predict(x)
