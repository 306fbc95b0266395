"""SANTA: source anchoring and target alignment for continual test-time adaptation.

Chakrabarty et al., "SANTA: Source Anchoring Network and Target Alignment for Continual Test
Time Adaptation", TMLR 2023 (https://openreview.net/forum?id=V7guVYzvE4), as in the code of
Döbler et al.'s benchmark (``classification/methods/santa.py``). On every test batch ``x``, with
the adapting model's predictions ``p(x)``, ``p(aug x)`` and the frozen source (anchor) model's
``q(x)``:

* source anchoring: ``1/2 CE(q(x), p(x)) + 1/2 CE(q(x), p(aug x))``, the cross-entropy
  ``-sum_c p_c log q_c`` of the anchor's log-probabilities under the adapting model's
  probabilities (``lambda_ce_trg``);
* target alignment: the contrastive loss of ``x``'s features, ``aug x``'s features and ``x``'s
  nearest source prototype through a projection head (:class:`PrototypeContrast`, as RMT's;
  ``lambda_cont``); the prototypes are the class means of the source features, over one
  shuffled pass of the source training data in batches of the test batch size, computed when
  adaptation starts.

One optimizer step on the sum; the prediction returned is ``p(x)`` before the step. Adapted: the
norm layers' affine parameters and the projection head; BatchNorm normalises with test-batch
statistics (the anchor's too, and the source pass's). The augmentation is CoTTA's
(:class:`TTAugment`). Defaults are the CIFAR-10-C settings of the benchmark
(``cfgs/cifar10_c/santa.yaml`` over ``conf.py``: Adam lr 1e-3, both weights 1, temperature
0.1, projection 128 wide). Without source data set ``lambda_cont: 0``.

Paper symbols: the loss weights keep the code's names; ``tau`` -> ``temperature``.
"""

from typing import Annotated

import torch
from pydantic import Field

from clpeft.components.tta.adapting_strategy import AdaptingStrategy
from clpeft.components.tta.augment import TTAugment
from clpeft.components.tta.losses import soft_cross_entropy
from clpeft.components.tta.online_adaptation import classifier
from clpeft.components.tta.options import AdaptationOptions
from clpeft.components.tta.prototype_contrast import PrototypeContrast
from clpeft.components.tta.source_data import source_training_data
from clpeft.components.tta.source_reset import SourceReset
from clpeft.data import DataView
from clpeft.experience import Experience
from clpeft.registry import register_strategy
from clpeft.schema import flat_options

PROTOTYPE_SAMPLES = 100000  # the code stops its source pass after the batch that passes this many


@register_strategy("santa")
class SANTA(AdaptingStrategy):
    """SANTA: anchoring to the source model's predictions and prototype contrast (Chakrabarty et al. 2023).

    Args:
        backbone: a feature extractor with normalisation layers.
        online: the test-time optimizer and the adapted parameters, written flat (``lr``, ``params``, ...).
        lambda_ce_trg: weight of the source-anchoring cross-entropy.
        lambda_cont: weight of the contrastive loss (0: no prototypes, no source data; the head stays unused).
        temperature: temperature of the contrastive loss.
        projection_dim: width of the projection head.
        flip: horizontal-flip probability of the augmentation (0 for digits-like data).
    """

    @flat_options
    def __init__(
        self,
        backbone,
        online: AdaptationOptions = AdaptationOptions(),
        lambda_ce_trg: Annotated[float, Field(ge=0)] = 1.0,
        lambda_cont: Annotated[float, Field(ge=0)] = 1.0,
        temperature: Annotated[float, Field(gt=0)] = 0.1,
        projection_dim: Annotated[int, Field(ge=1)] = 128,
        flip: Annotated[float, Field(ge=0, le=1)] = 0.5,
    ):
        super().__init__(backbone, online)
        self.lambda_ce_trg = lambda_ce_trg
        self.lambda_cont = lambda_cont
        self.anchor = SourceReset(classifier(backbone, self.head))
        self.contrast = PrototypeContrast(backbone.feature_dim, projection_dim, temperature)
        self.augment = TTAugment(flip=flip)

    def prepare_adaptation(self, exp: Experience) -> None:
        source = source_training_data(exp, "santa", "strategy.lambda_cont: 0") if self.lambda_cont > 0 else None
        net = classifier(self.backbone, self.head)
        extra = self.contrast.projector.parameters() if source is not None else ()
        self.adaptation.prepare(self, net, on_start=lambda: self._start(net, source), extra=extra)

    def _start(self, net, source: DataView | None) -> None:
        """Anchor = the source model; source prototypes from one shuffled pass."""
        self.anchor.capture(net)
        if source is not None:
            batches = ((self.backbone(b.x), b.y) for b in self.batches(source, self._data.batch_size, shuffle=True))
            self.contrast.compute_prototypes(batches, self.head.n_classes, PROTOTYPE_SAMPLES)

    def adapt(self, x: torch.Tensor) -> torch.Tensor:
        self.adaptation.begin_batch(self)
        features = self.backbone(x)
        features_aug = self.backbone(self.augment(x))
        logits, logits_aug = self.head(features), self.head(features_aug)
        with torch.no_grad():
            anchor = self.anchor.source(x)
        loss = self.lambda_ce_trg * (0.5 * soft_cross_entropy(anchor, logits) + 0.5 * soft_cross_entropy(anchor, logits_aug)).mean()
        if self.lambda_cont > 0:
            loss = loss + self.lambda_cont * self.contrast(features, features_aug)
        self.adaptation.step(loss)
        return logits.detach()
