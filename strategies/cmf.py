"""CMF: continual model fusion of the adapting model with a source-filtered hidden model.

Lee et al., "Becoming a Foundation Model for Continual Test-Time Adaptation? Continual Model
Fusion", ICLR 2024 (https://openreview.net/forum?id=BllUWdpIOA), as in the code of Döbler et
al.'s benchmark (``classification/methods/cmf.py``). On every test batch:

1. the prediction ``z`` and one optimizer step on ROID's loss (Marsden et al., WACV 2024:
   diversity- and certainty-weighted soft likelihood ratio plus consistency with an
   augmentation, :class:`CertaintyDiversityLoss`);
2. the hidden model is filtered towards the source and the adapted weights are fused with it
   (:class:`ModelFusion`: ``alpha``, ``gamma``, process noise ``q``);
3. the returned prediction is ``z`` (before the step) corrected by the smoothed batch prior
   (:func:`prior_correction`).

Adapted: the norm layers' affine parameters; BatchNorm normalises with test-batch statistics.
Defaults are the CIFAR-10-C settings of the benchmark (``cfgs/cifar10_c/cmf.yaml`` over
``conf.py``: Adam lr 1e-3, ``alpha = gamma = 0.99``, ``q = 0.005``, ROID's weighting options).

Paper symbols: ``alpha``, ``gamma``, ``q`` -> ``alpha``, ``gamma``, ``q``; ROID's ``T`` -> ``temperature``.
"""

from typing import Annotated

from pydantic import Field

from clpeft.components.tta.certainty_diversity import CertaintyDiversityOptions
from clpeft.components.tta.certainty_diversity_adaptation import CertaintyDiversityAdaptation
from clpeft.components.tta.model_fusion import ModelFusion
from clpeft.components.tta.online_adaptation import classifier
from clpeft.components.tta.options import AdaptationOptions
from clpeft.registry import register_strategy
from clpeft.schema import flat_options


@register_strategy("cmf")
class CMF(CertaintyDiversityAdaptation):
    """CMF: ROID's loss with continual fusion of a source-filtered hidden model (Lee et al. 2024).

    Args:
        backbone: a feature extractor with normalisation layers.
        online: the test-time optimizer and the adapted parameters, written flat (``lr``, ``params``, ...).
        roid: ROID's loss and output options, written flat (``use_weighting``, ``temperature``, ``flip``, ...).
        alpha: how fast the hidden model returns to the source.
        gamma: share of the adapted weights the fusion keeps.
        q: process noise of the filter, per 38,400 adapted weights.
    """

    @flat_options
    def __init__(
        self,
        backbone,
        online: AdaptationOptions = AdaptationOptions(),
        roid: CertaintyDiversityOptions = CertaintyDiversityOptions(),
        alpha: Annotated[float, Field(ge=0, le=1)] = 0.99,
        gamma: Annotated[float, Field(ge=0, le=1)] = 0.99,
        q: Annotated[float, Field(ge=0)] = 0.005,
    ):
        super().__init__(backbone, online, roid)
        self.fusion = ModelFusion(classifier(backbone, self.head), alpha, gamma, q)

    @property
    def anchor(self) -> ModelFusion:
        return self.fusion
