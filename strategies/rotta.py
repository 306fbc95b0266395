"""RoTTA: robust test-time adaptation with a category-balanced memory and a mean teacher.

Yuan et al., "Robust Test-Time Adaptation in Dynamic Scenarios", CVPR 2023
(https://arxiv.org/abs/2303.13899): for correlated, changing test streams. On every test batch:

1. the teacher predicts (its robust BatchNorm on the stored statistics); each sample enters the
   memory with its pseudo-label and entropy ``-sum p log(p + 1e-6)`` (:class:`CategoryBalancedMemory`,
   CSTU, section 3.3), one at a time;
2. every ``update_frequency`` samples: the teacher labels the memory, the student sees its strong
   augmentation (CoTTA's, :class:`TTAugment`), both normalise with robust BatchNorm that also
   updates its statistics with momentum ``alpha`` (:class:`RobustBatchNorm`, section 3.2), and one
   optimizer step on the soft cross-entropy to the teacher weighted by timeliness (eq. 7-8); then
   the teacher's weights follow the student's, ``theta' <- (1 - nu) theta' + nu theta`` (eq. 6).

The prediction returned is the teacher's from step 1. Adapted: the norm layers' affine
parameters. Defaults are the CIFAR-10-C settings of Döbler et al.'s benchmark
(``cfgs/cifar10_c/rotta.yaml`` over ``conf.py``: Adam lr 1e-3, ``N`` = 64, update every 64
samples, ``nu`` 0.001, ``alpha`` 0.05, ``lambda_t = lambda_u = 1``).

Paper symbols: ``N`` -> ``memory_size``, ``nu`` -> ``nu``, ``alpha`` -> ``alpha``, ``lambda_t``,
``lambda_u`` -> ``lambda_t``, ``lambda_u``.
"""

from typing import Annotated

import torch
from pydantic import Field

from clpeft.components.regularization.ema import EMATeacher
from clpeft.components.tta.adapting_strategy import AdaptingStrategy
from clpeft.components.tta.augment import TTAugment
from clpeft.components.tta.category_balanced_memory import CategoryBalancedMemory, timeliness_weight
from clpeft.components.tta.losses import soft_cross_entropy
from clpeft.components.tta.online_adaptation import classifier
from clpeft.components.tta.options import AdaptationOptions
from clpeft.components.tta.robust_batch_norm import RobustBatchNorm, batch_norm_layers_of
from clpeft.experience import Experience
from clpeft.registry import register_strategy
from clpeft.schema import flat_options


@register_strategy("rotta")
class RoTTA(AdaptingStrategy):
    """RoTTA: robust BatchNorm, category-balanced memory and a timeliness-weighted mean teacher (Yuan et al. 2023).

    Args:
        backbone: a feature extractor with normalisation layers.
        online: the test-time optimizer and the adapted parameters, written flat (``lr``, ...).
        memory_size: ``N``, samples in the memory.
        update_frequency: test samples between two updates.
        nu: the teacher's update rate.
        alpha: momentum of the robust BatchNorm statistics.
        lambda_t: weight of timeliness in the memory's score.
        lambda_u: weight of uncertainty in the memory's score.
        flip: horizontal-flip probability of the strong augmentation (0 for digits-like data).
    """

    @flat_options
    def __init__(
        self,
        backbone,
        online: AdaptationOptions = AdaptationOptions(),
        memory_size: Annotated[int, Field(ge=1)] = 64,
        update_frequency: Annotated[int, Field(ge=1)] = 64,
        nu: Annotated[float, Field(ge=0, le=1)] = 0.001,
        alpha: Annotated[float, Field(ge=0, le=1)] = 0.05,
        lambda_t: Annotated[float, Field(ge=0)] = 1.0,
        lambda_u: Annotated[float, Field(ge=0)] = 1.0,
        flip: Annotated[float, Field(ge=0, le=1)] = 0.5,
    ):
        super().__init__(backbone, online, batch_statistics=False)
        self.memory_size = memory_size
        self.update_frequency = update_frequency
        self.lambdas = (lambda_t, lambda_u)
        self.teacher = EMATeacher(classifier(backbone, self.head), 1 - nu, buffers="keep")
        self.memory = CategoryBalancedMemory(memory_size, 1, lambda_t, lambda_u)
        self.robust = RobustBatchNorm(alpha)
        self.augment = TTAugment(flip=flip)
        self.register_buffer("seen", torch.zeros((), dtype=torch.long))

    def prepare_adaptation(self, exp: Experience) -> None:
        net = classifier(self.backbone, self.head)
        self.adaptation.prepare(self, net, on_start=lambda: self._start(net))
        self.robust.attach(batch_norm_layers_of(net) + batch_norm_layers_of(self.teacher.model))

    def _start(self, net) -> None:
        self.teacher.reset(net)
        self.memory = CategoryBalancedMemory(self.memory_size, self.head.n_classes, *self.lambdas)

    def adapt(self, x: torch.Tensor) -> torch.Tensor:
        self.adaptation.begin_batch(self)
        with torch.no_grad():
            logits = self.teacher(x)
            probs = logits.softmax(1)
            labels = probs.argmax(1).tolist()
            uncertainty = (-probs * torch.log(probs + 1e-6)).sum(1).tolist()
        for sample, label, u in zip(x, labels, uncertainty):
            self.memory.add(sample, label, u)
            self.seen += 1
            if int(self.seen) % self.update_frequency == 0:
                self._update()
        return logits

    def _update(self) -> None:
        stored = self.memory.batch()
        if stored is None:
            return
        samples, ages = stored
        student = classifier(self.backbone, self.head)
        strong = self.augment(samples)
        with self.robust.updating():
            with torch.no_grad():
                target = self.teacher(samples)
            loss = (soft_cross_entropy(student(strong), target) * timeliness_weight(ages, self.memory_size).to(target)).mean()
        self.adaptation.step(loss)
        self.teacher.update(student)
