"""EATA: efficient anti-forgetting test-time adaptation.

Niu et al., "Efficient Test-Time Model Adaptation without Forgetting", ICML 2022
(https://arxiv.org/abs/2204.02610). Tent's entropy minimisation of the norm layers' affine
parameters, restricted to reliable, non-redundant samples and regularised towards the source:

    min  sum_{x in S} exp(E_0 - H(x)) H(x)  +  beta sum_i w(theta_i) (theta_i - theta_i^o)^2   (eq. 6, 8)

* reliable: ``H(x) < E_0`` with ``E_0 = entropy_factor * ln C`` (eq. 3; 0.4 in the paper);
* non-redundant: ``|cos(m, p(x))| < epsilon`` against the moving average ``m`` of selected
  predictions (eq. 4-5);
* ``w`` (eq. 9): importance of each adapted parameter, measured once on ``fisher_size``
  source-like samples (a random subset of the source training data here, without training
  augmentation, as the reference's source loader) with the model's own pseudo-labels, as the
  mean squared mini-batch gradient of the authors' code (see
  :func:`clpeft.components.tta.losses.batch_gradient_importance`), in mini-batches of the test
  batch size (``train.batch_size``) like the reference's, with the test-time BatchNorm
  (test-batch statistics); ``theta^o`` the source values.

The loss is averaged over the selected samples and no step is taken when none is selected.
Defaults are those of the CIFAR-10-C benchmark by Döbler et al.
(github.com/mariodoebler/test-time-adaptation: Adam lr 1e-3, ``epsilon`` 0.4, ``beta`` 1, 2,000
source samples); the paper's ImageNet values are SGD lr 2.5e-4, ``epsilon`` 0.05, ``beta`` 2,000.
``fisher_alpha: 0`` gives ETA (no regulariser, no source data needed).

Paper symbols: ``E_0 / ln C`` -> ``entropy_factor``, ``epsilon`` -> ``redundancy_margin``,
``beta`` -> ``fisher_alpha``, ``|Q|`` -> ``fisher_size``.
"""

from typing import Annotated

import torch
from pydantic import Field

from clpeft.components.regularization.fisher import FisherPenalty
from clpeft.components.tta.adapting_strategy import AdaptingStrategy
from clpeft.components.tta.losses import batch_gradient_importance
from clpeft.components.tta.online_adaptation import classifier
from clpeft.components.tta.options import AdaptationOptions
from clpeft.components.tta.reliable_entropy import ReliableEntropy, ReliableEntropyOptions
from clpeft.components.tta.source_data import source_training_data
from clpeft.experience import Experience
from clpeft.registry import register_strategy
from clpeft.schema import flat_options


@register_strategy("eata")
class EATA(AdaptingStrategy):
    """EATA: entropy minimisation on reliable, non-redundant samples with a Fisher anti-forgetting term (Niu et al. 2022).

    Args:
        backbone: a feature extractor with normalisation layers.
        online: the test-time optimizer and the adapted parameters, written flat (``lr``, ``params``, ...).
        reliable: ETA's filter, ``entropy_factor`` (``E_0 = entropy_factor * ln C``) and
            ``redundancy_margin`` (``epsilon``), written flat
            (:class:`~clpeft.components.tta.reliable_entropy.ReliableEntropyOptions`).
        fisher_alpha: ``beta``, weight of the Fisher regulariser (0: ETA).
        fisher_size: source samples used to weigh the parameters.
        fisher_batch_size: mini-batch size of that pass (default: the test batch size, as the reference).
    """

    @flat_options
    def __init__(
        self,
        backbone,
        online: AdaptationOptions = AdaptationOptions(),
        reliable: ReliableEntropyOptions = ReliableEntropyOptions(),
        fisher_alpha: Annotated[float, Field(ge=0)] = 1.0,
        fisher_size: Annotated[int, Field(ge=1)] = 2000,
        fisher_batch_size: Annotated[int, Field(ge=1)] | None = None,
    ):
        super().__init__(backbone, online)
        self.fisher_alpha = fisher_alpha
        self.fisher_size = fisher_size
        self.fisher_batch_size = fisher_batch_size
        self.filter = ReliableEntropy(reliable)
        self.penalty = FisherPenalty()

    def before_experience(self, exp: Experience) -> None:
        super().before_experience(exp)
        self.filter.start(self.head.n_classes)

    def prepare_adaptation(self, exp: Experience) -> None:
        self.adaptation.prepare(self, classifier(self.backbone, self.head), on_start=lambda: self._weigh(exp))

    def _weigh(self, exp: Experience) -> None:
        """Record the source parameters and their importance ``w`` (eq. 9)."""
        if self.fisher_alpha == 0:
            return
        source = source_training_data(exp, "eata", "strategy.fisher_alpha: 0 (ETA)")
        subset = source.take(torch.randperm(len(source))[: self.fisher_size])
        params = {n: p for n, p in self.named_parameters() if p.requires_grad}
        with torch.enable_grad():
            importance = batch_gradient_importance(self.predict, (b.x for b in self.batches(subset, self.fisher_batch_size)), params)
        self.penalty.terms = []
        self.penalty.add(params, importance)

    def adapt(self, x: torch.Tensor) -> torch.Tensor:
        self.adaptation.begin_batch(self)
        logits = self.predict(x)
        loss = self.filter.loss(logits)
        if loss is not None:
            if self.penalty.terms:
                loss = loss + self.fisher_alpha * self.penalty(dict(self.named_parameters()))
            self.adaptation.step(loss)
        return logits.detach()
