"""ROID's test-time step as a base class, with the weight update after it left to the method (ROID, CMF).

Marsden et al., "Universal Test-time Adaptation through Weight Ensembling, Diversity Weighting,
and Prior Correction", WACV 2024 (https://arxiv.org/abs/2306.00650), and Lee et al., "Becoming a
Foundation Model for Continual Test-Time Adaptation? Continual Model Fusion" (CMF), ICLR 2024,
share every step but one: the prediction ``z``, one optimizer step on
:class:`CertaintyDiversityLoss` (eq. 3-7), then a weight update towards the source (ROID's
ensembling, eq. 9; CMF's filtered hidden model), and ``z`` corrected by the smoothed batch prior
(eq. 8). A subclass names that update through :attr:`~CertaintyDiversityAdaptation.anchor`: a
module whose ``capture(net)`` records the source when adaptation starts and whose
``fuse(net, names)`` updates the adapted parameters ``names`` after every step.
"""

from __future__ import annotations

import torch
from torch import nn

from clpeft.components.tta.adapting_strategy import AdaptingStrategy
from clpeft.components.tta.certainty_diversity import CertaintyDiversityLoss, CertaintyDiversityOptions
from clpeft.components.tta.online_adaptation import classifier
from clpeft.components.tta.options import AdaptationOptions
from clpeft.components.tta.weight_ensembling import adapted_names
from clpeft.experience import Experience


class CertaintyDiversityAdaptation(AdaptingStrategy):
    """ROID's loss step, then the subclass's :attr:`anchor` update (base class of ROID and CMF).

    Args:
        backbone: a feature extractor with normalisation layers.
        online: the test-time optimizer and the adapted parameters.
        loss: ROID's loss and output options.
    """

    def __init__(self, backbone, online: AdaptationOptions, loss: CertaintyDiversityOptions):
        super().__init__(backbone, online)
        self.loss = CertaintyDiversityLoss(loss)

    @property
    def anchor(self) -> nn.Module:
        """The module that records the source (``capture(net)``) and moves the adapted weights after a step (``fuse(net, names)``)."""
        raise NotImplementedError

    def prepare_adaptation(self, exp: Experience) -> None:
        net = classifier(self.backbone, self.head)
        self.adaptation.prepare(self, net, on_start=lambda: self.anchor.capture(net))

    def adapt(self, x: torch.Tensor) -> torch.Tensor:
        self.adaptation.begin_batch(self)
        net = classifier(self.backbone, self.head)
        logits = net(x)
        self.adaptation.step(self.loss(net, x, logits, self._data.batch_size))
        self.anchor.fuse(net, adapted_names(net))
        return self.loss.output(logits)
