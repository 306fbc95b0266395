"""RDumb: ETA with a periodic reset to the source model.

Press et al., "RDumb: A simple approach that questions our progress in continual test-time
adaptation", NeurIPS 2023 (https://arxiv.org/abs/2306.05401), section 4: EATA's entropy
minimisation on reliable, non-redundant samples without its Fisher regulariser (ETA: Niu et
al., ICML 2022, eq. 3-6, :class:`EATASampleFilter`; the loss ``exp(E_0 - H(x)) H(x)`` averaged
over the selected samples, no step when none is selected), and every ``T`` adaptation steps
(test batches, whether or not a sample was selected) the model, the optimizer and the moving
probability vector return to the source (:class:`SourceReset`). The step count runs over the
whole stream, across domains.

Defaults are the CIFAR-10-C settings of Döbler et al.'s benchmark (``cfgs/cifar10_c/rdumb.yaml``,
its EATA with ``FISHER_ALPHA: 0`` and ``RESET_AFTER_NUM_UPDATES: 1000``: Adam lr 1e-3,
``E_0 = 0.4 ln C``, ``epsilon`` 0.4, ``T`` = 1,000); its ImageNet-C setting is SGD lr 2.5e-4 with
``epsilon`` 0.05.

Paper symbols: ``T`` -> ``reset_every``; EATA's ``E_0 / ln C`` -> ``entropy_factor``, ``epsilon``
-> ``redundancy_margin``.
"""

from typing import Annotated

import torch
from pydantic import Field

from clpeft.components.tta.adapting_strategy import AdaptingStrategy
from clpeft.components.tta.online_adaptation import classifier
from clpeft.components.tta.options import AdaptationOptions
from clpeft.components.tta.reliable_entropy import ReliableEntropy, ReliableEntropyOptions
from clpeft.components.tta.source_reset import SourceReset
from clpeft.experience import Experience
from clpeft.registry import register_strategy
from clpeft.schema import flat_options


@register_strategy("rdumb")
class RDumb(AdaptingStrategy):
    """RDumb: ETA reset to the source model every T steps (Press et al. 2023).

    Args:
        backbone: a feature extractor with normalisation layers.
        online: the test-time optimizer and the adapted parameters, written flat (``lr``, ``params``, ...).
        reliable: the ETA loss minimised between resets, flat keys ``entropy_factor`` and
            ``redundancy_margin`` (:class:`~clpeft.components.tta.reliable_entropy.ReliableEntropyOptions`).
        reset_every: ``T``, adaptation steps between two resets.
    """

    @flat_options
    def __init__(
        self,
        backbone,
        online: AdaptationOptions = AdaptationOptions(),
        reliable: ReliableEntropyOptions = ReliableEntropyOptions(),
        reset_every: Annotated[int, Field(ge=1)] = 1000,
    ):
        super().__init__(backbone, online)
        self.reset_every = reset_every
        self.filter = ReliableEntropy(reliable)
        self.reset = SourceReset(classifier(backbone, self.head))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    def before_experience(self, exp: Experience) -> None:
        super().before_experience(exp)
        self.filter.start(self.head.n_classes)

    def prepare_adaptation(self, exp: Experience) -> None:
        net = classifier(self.backbone, self.head)
        self.adaptation.prepare(self, net, on_start=lambda: self.reset.capture(net))

    def adapt(self, x: torch.Tensor) -> torch.Tensor:
        self.adaptation.begin_batch(self)
        net = classifier(self.backbone, self.head)
        logits = net(x)
        loss = self.filter.loss(logits)
        if loss is not None:
            self.adaptation.step(loss)
        self.steps += 1
        if int(self.steps) % self.reset_every == 0:
            self.reset.restore(net, self.adaptation.optimizer)
            self.filter.moving_probs = None
        return logits.detach()
