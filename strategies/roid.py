"""ROID: weight ensembling, diversity and certainty weighting, prior correction.

Marsden et al., "Universal Test-time Adaptation through Weight Ensembling, Diversity Weighting,
and Prior Correction", WACV 2024 (https://arxiv.org/abs/2306.00650). On every test batch:

1. the prediction ``z`` and one optimizer step on the diversity- and certainty-weighted soft
   likelihood ratio plus the weighted consistency with an augmentation (eq. 3-7,
   :class:`CertaintyDiversityLoss`);
2. weight ensembling (eq. 9, :func:`blend_`): the adapted weights move towards the source's,
   ``theta <- alpha theta + (1 - alpha) theta_0``;
3. the returned prediction is ``z`` (before the step) corrected by the smoothed batch prior
   (eq. 8, :func:`prior_correction`).

Adapted: the norm layers' affine parameters; BatchNorm normalises with test-batch statistics.
Defaults are the CIFAR-10-C settings of Döbler et al.'s benchmark (``cfgs/cifar10_c/roid.yaml``
over ``conf.py``: Adam lr 1e-3, ``alpha`` 0.99, ``p_bar`` momentum 0.9, ``T = 1/3``); the loss
divides by the test batch size (``train.batch_size``) as there.

Paper symbols: ``alpha`` -> ``momentum_src``, ``T`` -> ``temperature``.
"""

from typing import Annotated

import torch
from pydantic import Field

from clpeft.components.tta.adapting_strategy import AdaptingStrategy
from clpeft.components.tta.certainty_diversity import CertaintyDiversityLoss, CertaintyDiversityOptions
from clpeft.components.tta.online_adaptation import classifier
from clpeft.components.tta.options import AdaptationOptions
from clpeft.components.tta.source_reset import SourceReset
from clpeft.components.tta.weight_ensembling import adapted_names, blend_
from clpeft.experience import Experience
from clpeft.registry import register_strategy
from clpeft.schema import flat_options


@register_strategy("roid")
class ROID(AdaptingStrategy):
    """ROID: weighted soft-likelihood-ratio self-training, weight ensembling and prior correction (Marsden et al. 2024).

    Args:
        backbone: a feature extractor with normalisation layers.
        online: the test-time optimizer and the adapted parameters, written flat (``lr``, ``params``, ...).
        roid: loss and output options, written flat (``use_weighting``, ``temperature``, ``flip``, ...).
        momentum_src: ``alpha`` of the weight ensembling with the source (1: none).
    """

    @flat_options
    def __init__(
        self,
        backbone,
        online: AdaptationOptions = AdaptationOptions(),
        roid: CertaintyDiversityOptions = CertaintyDiversityOptions(),
        momentum_src: Annotated[float, Field(ge=0, le=1)] = 0.99,
    ):
        super().__init__(backbone, online)
        self.momentum_src = momentum_src
        self.loss = CertaintyDiversityLoss(roid)
        self.source = SourceReset(classifier(backbone, self.head))

    def prepare_adaptation(self, exp: Experience) -> None:
        net = classifier(self.backbone, self.head)
        self.adaptation.prepare(self, net, on_start=lambda: self.source.capture(net))

    def adapt(self, x: torch.Tensor) -> torch.Tensor:
        self.adaptation.begin_batch(self)
        net = classifier(self.backbone, self.head)
        logits = net(x)
        self.adaptation.step(self.loss(net, x, logits, self._data.batch_size))
        blend_(net, self.source.source, self.momentum_src, adapted_names(net))
        return self.loss.output(logits)
