"""CoTTA: continual test-time adaptation with a mean teacher and stochastic restoration.

Wang et al., "Continual Test-Time Domain Adaptation", CVPR 2022
(https://arxiv.org/abs/2203.13591). On every test batch ``x``:

1. pseudo-label from the EMA teacher, ``y' = f'(x)``; when the source (anchor) model's mean
   confidence ``mean_i max_c f_0(x_i)_c`` is below ``p_th`` the teacher's predictions on ``N``
   random augmentations are averaged instead (eq. 3-4, :func:`augmentation_average` with the
   authors' augmentation :class:`TTAugment`, one draw per augmentation for the whole batch);
2. student step on the soft cross-entropy ``-sum_c y'_c log f(x)_c`` (eq. 2; ``loss:
   symmetric`` is the half-half symmetric version the benchmark's code uses on ImageNet);
3. teacher update ``theta' <- alpha theta' + (1 - alpha) theta`` (eq. 1, :class:`EMATeacher`);
4. stochastic restore: each adapted weight element is reset to its source value with
   probability ``p`` (eq. 5-6, :class:`StochasticRestore`).

The prediction returned is the teacher's (``y'``). Every layer's weight and bias adapts (as the
reference code: a ViT's class token and position embedding stay fixed); BatchNorm layers of
student, teacher and anchor use test-batch statistics. Defaults are the authors' CIFAR-10-C
settings (``cfgs/cifar10_c/cotta.yaml`` of Döbler et al.'s benchmark and of CoTTA's code: Adam
lr 1e-3, ``alpha`` 0.999, ``p`` 0.01, ``p_th`` 0.92, ``N`` 32); their ImageNet-C settings are
SGD lr 0.01, ``p`` 0.001, ``p_th`` 0.1 and the symmetric loss. The authors' original CIFAR code
also augments when the anchor is confident (and discards the result): the same updates, other
random draws.

Paper symbols: ``alpha`` -> ``ema_momentum``, ``p`` -> ``restore_p``, ``p_th`` ->
``confidence_threshold``, ``N`` -> ``n_augmentations``.
"""

from typing import Annotated, Literal

import torch
from pydantic import Field

from clpeft.components.regularization.distillation import frozen_copy
from clpeft.components.regularization.ema import EMATeacher
from clpeft.components.tta.adapting_strategy import AdaptingStrategy
from clpeft.components.tta.augment import TTAugment
from clpeft.components.tta.augment_average import augmentation_average
from clpeft.components.tta.losses import soft_cross_entropy, symmetric_cross_entropy
from clpeft.components.tta.online_adaptation import classifier
from clpeft.components.tta.options import AdaptationOptions
from clpeft.components.tta.stochastic_restore import StochasticRestore
from clpeft.experience import Experience
from clpeft.registry import register_strategy
from clpeft.schema import flat_options


@register_strategy("cotta")
class CoTTA(AdaptingStrategy):
    """CoTTA: EMA teacher, augmentation-averaged pseudo-labels and stochastic restore (Wang et al. 2022).

    Args:
        backbone: the source feature extractor.
        online: the test-time optimizer and the adapted parameters, written flat (``lr``, ``params``, ...); CoTTA adapts every weight and bias (``params: all``).
        ema_momentum: teacher momentum ``alpha``.
        restore_p: restore probability ``p``.
        confidence_threshold: ``p_th``: augmentation averaging below this anchor confidence.
        n_augmentations: ``N``.
        flip: horizontal-flip probability of the augmentations (0 for digits-like data).
        loss: ``cross_entropy`` to the teacher (CIFAR code) or ``symmetric`` (ImageNet code).
    """

    @flat_options
    def __init__(
        self,
        backbone,
        online: AdaptationOptions = AdaptationOptions(params="all"),
        ema_momentum: Annotated[float, Field(ge=0, le=1)] = 0.999,
        restore_p: Annotated[float, Field(ge=0, le=1)] = 0.01,
        confidence_threshold: Annotated[float, Field(ge=0, le=1)] = 0.92,
        n_augmentations: Annotated[int, Field(ge=1)] = 32,
        flip: Annotated[float, Field(ge=0, le=1)] = 0.5,
        loss: Literal["cross_entropy", "symmetric"] = "cross_entropy",
    ):
        super().__init__(backbone, online)
        self.teacher = EMATeacher(classifier(backbone, self.head), ema_momentum)
        self.anchor = frozen_copy(classifier(backbone, self.head))
        self.restore = StochasticRestore(restore_p)
        self.confidence_threshold = confidence_threshold
        self.n_augmentations = n_augmentations
        self.augment = TTAugment(flip=flip)
        self.loss = loss

    def prepare_adaptation(self, exp: Experience) -> None:
        self.adaptation.prepare(self, classifier(self.backbone, self.head), on_start=self._copy_source)

    def _copy_source(self) -> None:
        source = classifier(self.backbone, self.head)
        self.teacher.reset(source)
        self.anchor = frozen_copy(source)

    def adapt(self, x: torch.Tensor) -> torch.Tensor:
        self.adaptation.begin_batch(self)
        student = classifier(self.backbone, self.head)
        logits = student(x)
        with torch.no_grad():
            anchor_confidence = self.anchor(x).softmax(1).max(1).values.mean()
            if anchor_confidence < self.confidence_threshold:
                target = augmentation_average(self.teacher, x, self.augment, self.n_augmentations)
            else:
                target = self.teacher(x)
        if self.loss == "symmetric":
            self.adaptation.step(symmetric_cross_entropy(logits, target).mean())
        else:
            self.adaptation.step(soft_cross_entropy(logits, target).mean())
        self.teacher.update(student)
        self.restore(student, self.anchor)
        return target
