"""Dual Teacher for test-time adaptation: two temporary EMA teachers that take turns.

Na et al., "Switching Temporary Teachers for Semi-Supervised Semantic Segmentation",
NeurIPS 2023 (https://arxiv.org/abs/2310.18640), applied to an unlabeled test stream. The
teacher on duty predicts the clean batch; its confident predictions (``max_c q_c >= tau``)
become hard pseudo-labels for the student on a strongly augmented view (the authors'
consistency loss, averaged over the whole batch):

    L = 1/B sum_i 1[max_c q_ic >= tau] CE(f(aug(x_i)), argmax_c q_ic).

After every student step only the teacher on duty follows by EMA, with the ramp
``alpha_t = min(alpha, 1 - 1/(t + 1))`` restarted at each shift, and the teachers switch every
``period`` batches (every epoch in the paper; a test stream is seen once, so a shift is a
number of batches here) — see :class:`clpeft.components.regularization.ema.DualTeacher`. The prediction is
the teacher on duty's. CoTTA's random augmentation (:class:`TTAugment`) stands in for the
paper's strong colour jitter + random grayscale. The paper's CutMix/ClassMix supervised terms need labels and are not
part of the test-time version.

Only the norm layers' affine parameters adapt by default (``params: norm``, as in Tent): the
paper trains the whole network, but it has labelled data to anchor it; on an unlabelled stream
hard pseudo-labels on every parameter feed on their own errors (offline Fashion-MNIST-C table in
``benchmarks/RESULTS.md``: mean error 0.466 with ``params: all``, climbing from 0.26 on the first
domain to 0.51 on the last, which the source model gets 0.29 wrong; 0.315 with ``norm``).

Paper symbols: ``alpha`` -> ``ema_momentum`` (0.99), ``tau`` -> ``confidence_threshold`` (0.95).
"""

from typing import Annotated

import torch
import torch.nn.functional as F
from pydantic import Field

from clpeft.components.regularization.ema import DualTeacher
from clpeft.components.tta.adapting_strategy import AdaptingStrategy
from clpeft.components.tta.augment import TTAugment
from clpeft.components.tta.online_adaptation import classifier
from clpeft.components.tta.options import AdaptationOptions
from clpeft.experience import Experience
from clpeft.registry import register_strategy
from clpeft.schema import flat_options


@register_strategy("dual_teacher")
class DualTeacherTTA(AdaptingStrategy):
    """Dual Teacher: temporary EMA teachers switched on a schedule give pseudo-labels (Na et al. 2023).

    Args:
        backbone: the source feature extractor.
        online: the test-time optimizer and the adapted parameters, written flat (``lr``, ``params``, ...).
        ema_momentum: ``alpha`` of the teacher on duty.
        period: batches per shift.
        n_teachers: teachers in the rotation (2 in the paper).
        confidence_threshold: ``tau`` for pseudo-labels.
        flip: horizontal-flip probability of the strong augmentation.
    """

    @flat_options
    def __init__(
        self,
        backbone,
        online: AdaptationOptions = AdaptationOptions(),
        ema_momentum: Annotated[float, Field(ge=0, le=1)] = 0.99,
        period: Annotated[int, Field(ge=1)] = 50,
        n_teachers: Annotated[int, Field(ge=1)] = 2,
        confidence_threshold: Annotated[float, Field(ge=0, le=1)] = 0.95,
        flip: Annotated[float, Field(ge=0, le=1)] = 0.5,
    ):
        super().__init__(backbone, online)
        self.teachers = DualTeacher(classifier(backbone, self.head), ema_momentum, period, n_teachers)
        self.confidence_threshold = confidence_threshold
        self.augment = TTAugment(flip=flip)

    def prepare_adaptation(self, exp: Experience) -> None:
        self.adaptation.prepare(
            self, classifier(self.backbone, self.head), on_start=lambda: self.teachers.reset(classifier(self.backbone, self.head))
        )

    def adapt(self, x: torch.Tensor) -> torch.Tensor:
        self.adaptation.begin_batch(self)
        student = classifier(self.backbone, self.head)
        with torch.no_grad():
            target = self.teachers(x)
            confidence, pseudo = target.softmax(1).max(1)
        loss = F.cross_entropy(student(self.augment(x)), pseudo, reduction="none")
        self.adaptation.step((loss * (confidence >= self.confidence_threshold)).mean())
        self.teachers.update(student)
        return target
