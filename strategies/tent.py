"""Tent: test-time entropy minimisation of the normalisation layers' affine parameters.

Wang et al., "Tent: Fully Test-Time Adaptation by Entropy Minimization", ICLR 2021
(https://arxiv.org/abs/2006.10726). On every unlabeled test batch the model normalises with the
batch statistics and takes one optimizer step on the mean prediction entropy (eq. 1)

    H(y_hat) = - sum_c p(y_hat_c) log p(y_hat_c),

updating only the channel-wise affine parameters ``gamma``, ``beta`` of the norm layers
(section 3.2). The returned prediction is the one computed before the step, as in the
authors' code. Defaults are the authors' CIFAR-10-C settings (Adam, lr 1e-3, beta1 0.9; their
ImageNet setting is ``optimizer: sgd``, ``lr: 2.5e-4``).

Paper symbols: ``gamma, beta`` -> the adapted parameters (``params: norm``).
"""

import torch

from clpeft.components.tta.adapting_strategy import AdaptingStrategy
from clpeft.components.tta.losses import entropy
from clpeft.components.tta.options import AdaptationOptions
from clpeft.registry import register_strategy
from clpeft.schema import flat_options


@register_strategy("tent")
class Tent(AdaptingStrategy):
    """Tent: entropy minimisation of norm-layer affine parameters at test time (Wang et al. 2021).

    Args:
        backbone: a feature extractor with normalisation layers (BatchNorm for batch statistics).
        online: the test-time optimizer and the adapted parameters, written flat (``lr``, ``params``, ...).
    """

    @flat_options
    def __init__(self, backbone, online: AdaptationOptions = AdaptationOptions()):
        super().__init__(backbone, online)

    def adapt(self, x: torch.Tensor) -> torch.Tensor:
        self.adaptation.begin_batch(self)
        logits = self.predict(x)
        self.adaptation.step(entropy(logits).mean())
        return logits.detach()
