"""ROID: weight ensembling, diversity and certainty weighting, prior correction.

Marsden et al., "Universal Test-time Adaptation through Weight Ensembling, Diversity Weighting,
and Prior Correction", WACV 2024 (https://arxiv.org/abs/2306.00650). On every test batch:

1. the prediction ``z`` and one optimizer step on the diversity- and certainty-weighted soft
   likelihood ratio plus the weighted consistency with an augmentation (eq. 3-7,
   :class:`CertaintyDiversityLoss`);
2. weight ensembling (eq. 9, :class:`SourceEnsemble`): the adapted weights move towards the source's,
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

from pydantic import Field

from clpeft.components.tta.certainty_diversity import CertaintyDiversityOptions
from clpeft.components.tta.certainty_diversity_adaptation import CertaintyDiversityAdaptation
from clpeft.components.tta.online_adaptation import classifier
from clpeft.components.tta.options import AdaptationOptions
from clpeft.components.tta.weight_ensembling import SourceEnsemble
from clpeft.registry import register_strategy
from clpeft.schema import flat_options


@register_strategy("roid")
class ROID(CertaintyDiversityAdaptation):
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
        super().__init__(backbone, online, roid)
        self.source = SourceEnsemble(classifier(backbone, self.head), momentum_src)

    @property
    def anchor(self) -> SourceEnsemble:
        return self.source
