"""MEMO: test-time adaptation of each test point on the marginal entropy of its augmentations.

Zhang et al., "MEMO: Test Time Robustness via Adaptation and Augmentation", NeurIPS 2022
(https://arxiv.org/abs/2110.09506), Algorithm 1. Each test point ``x`` is handled on its own,
from the source model (episodic: weights and optimizer reset before every point):

1. ``B`` AugMix views of ``x`` (:class:`AugMix`);
2. one optimizer step on the entropy of the views' mean prediction (eq. 2, :func:`marginal_entropy`);
3. the prediction on ``x`` itself with the adapted model.

BatchNorm layers use the source statistics with the batch's as a prior (``alpha`` weight on the
views' statistics, then on the single test point's; :class:`PriorBatchNorm`, MEMO's setting for
single-point adaptation); every layer's weight and bias adapts. Defaults are the CIFAR-10-C
settings of Döbler et al.'s benchmark (``cfgs/cifar10_c/memo.yaml``: SGD lr 0.005, Nesterov
momentum 0.9 (one step from a fresh optimizer: ``1.9 lr g``), ``B = 32``, ``alpha = 0.1``, test batch
size 1); a test batch of any size gives the same predictions, point by point. For ImageNet-sized
images the benchmark pre-augments with a random resized crop (``preaugment: resized_crop``).

Paper symbols: ``B`` -> ``n_augmentations``; Schneider et al.'s prior weight -> ``alpha``.
"""

from typing import Annotated

import torch
from pydantic import Field

from clpeft.components.tta.augmix import AugMix, PreAugment
from clpeft.components.tta.marginal_entropy import marginal_entropy
from clpeft.components.tta.online_adaptation import OnlineAdaptation, classifier
from clpeft.components.tta.options import AdaptationOptions
from clpeft.components.tta.prior_batch_norm import PriorBatchNorm, batch_norm_2d_layers
from clpeft.components.tta.source_reset import SourceReset
from clpeft.experience import Experience
from clpeft.registry import register_strategy
from clpeft.schema import flat_options
from clpeft.strategy import Strategy


@register_strategy("memo")
class MEMO(Strategy):
    """MEMO: per-point marginal entropy minimisation over AugMix views, reset after each point (Zhang et al. 2022).

    Args:
        backbone: the source feature extractor.
        online: the optimizer of the one step per point and the adapted parameters, written flat (``lr``, ...).
        n_augmentations: ``B``, AugMix views per test point.
        alpha: weight of the batch statistics in the prior BatchNorm (0: source statistics).
        preaugment: ``crop`` (pad 4 and crop) or ``resized_crop`` before the AugMix chains.
        severity: strength of the AugMix operations.
    """

    supported_scenarios = ("test_time_adaptation",)
    cache_features = False

    @flat_options
    def __init__(
        self,
        backbone,
        online: AdaptationOptions = AdaptationOptions(optimizer="sgd", lr=0.005, params="all"),
        n_augmentations: Annotated[int, Field(ge=1)] = 32,
        alpha: Annotated[float, Field(ge=0, le=1)] = 0.1,
        preaugment: PreAugment = "crop",
        severity: Annotated[float, Field(gt=0.1, le=10)] = 1.0,
    ):
        super().__init__(backbone)
        self.n_augmentations = n_augmentations
        self.adaptation = OnlineAdaptation(online, batch_statistics=False)
        self.prior = PriorBatchNorm(alpha)
        self.augmix = AugMix(preaugment, severity)
        self.reset = SourceReset(classifier(backbone, self.head))

    def before_experience(self, exp: Experience) -> None:
        super().before_experience(exp)
        if exp.train is None:
            net = classifier(self.backbone, self.head)
            self.adaptation.prepare(self, net, on_start=lambda: self._start(net))
            self.prior.attach(batch_norm_2d_layers(net))

    def _start(self, net) -> None:
        self.reset.capture(net)
        self.augmix.seed(int(torch.randint(0, 2**31 - 1, ())))

    def adapt(self, x: torch.Tensor) -> torch.Tensor:
        self.adaptation.begin_batch(self)
        net = classifier(self.backbone, self.head)
        logits = []
        for image in x:
            self.reset.restore(net, self.adaptation.optimizer)
            views = self.augmix.views(image.cpu(), self.n_augmentations).to(x.device)
            self.adaptation.step(marginal_entropy(net(views[1:])))
            with torch.no_grad():
                logits.append(net(views[:1]))
        return torch.cat(logits)
