"""RMT: the robust mean teacher for continual and gradual test-time adaptation.

Döbler et al., "Robust Mean Teacher for Continual and Gradual Test-Time Adaptation", CVPR 2023
(https://arxiv.org/abs/2211.13081). A student adapts to each test batch under three losses,
with the weighting of the authors' code (student ``p``, EMA teacher ``q``):

* self-training (eq. 3): symmetric cross-entropy to the teacher on the batch and on one random
  augmentation of it, ``1/2 SCE(p(x), q(x)) + 1/2 SCE(p(aug x), q(x))`` (weight ``lambda_ce_trg``);
* contrastive (eq. 4): the features of ``x``, of ``aug x`` and the source prototype nearest to
  ``x`` (cosine) are three views of one sample; a projection head (two linear layers, 128 wide)
  maps them into the space of the multi-view contrastive loss, temperature 0.1 (``lambda_cont``);
* source replay (section 3.4): cross-entropy on a labelled batch of the source training data
  (``lambda_ce_src``).

Before adaptation the source prototypes (class means of the source features, over one
shuffled pass of the source data) are computed and the mean-teacher pair is warmed up on
``warmup_samples // source_batch_size`` source batches with the symmetric cross-entropy of the
student to the teacher, the learning rate ramping linearly to ``lr`` (section 3.3); the
optimizer keeps its state afterwards. The teacher follows the student by EMA,
``theta' <- alpha theta' + (1 - alpha) theta``; the prediction is the ensemble ``f(x) + f'(x)``
of student and teacher logits. The augmentation is CoTTA's (:class:`TTAugment`).

Defaults are the authors' CIFAR-10-C settings (``cfgs/cifar10_c/rmt.yaml`` and ``conf.py`` of
Döbler et al.'s benchmark: Adam lr 1e-3, ``alpha`` 0.999, every weight and bias adapts,
BatchNorm uses test-batch statistics, 50,000 warm-up samples, every loss weight 1); as there,
source batches (prototypes, warm-up, replay) have the test batch size (``train.batch_size``)
unless ``source_batch_size`` says otherwise, and are read without training augmentation. Without
source data (a source model loaded from a checkpoint) set ``lambda_cont``, ``lambda_ce_src`` and
``warmup_samples`` to 0: that leaves the self-training core. A stream that resets to the source
model per domain redoes the prototypes and the warm-up each time; the reference resets to its
warmed-up state instead (the same procedure on other source batches).

Paper symbols: ``alpha`` -> ``ema_momentum``; the loss weights keep the code's names.
"""

from typing import Annotated

import torch
import torch.nn.functional as F
from pydantic import Field

from clpeft.components.regularization.ema import EMATeacher
from clpeft.components.tta.adapting_strategy import AdaptingStrategy
from clpeft.components.tta.augment import TTAugment
from clpeft.components.tta.losses import symmetric_cross_entropy
from clpeft.components.tta.online_adaptation import batch_norm_layers, classifier, use_batch_statistics
from clpeft.components.tta.options import AdaptationOptions
from clpeft.components.tta.prototype_contrast import PrototypeContrast
from clpeft.components.tta.source_data import SourceBatches, source_training_data
from clpeft.data import DataView
from clpeft.experience import Experience
from clpeft.registry import register_strategy
from clpeft.schema import flat_options

NO_SOURCE_DATA = "strategy.lambda_cont: 0, strategy.lambda_ce_src: 0 and strategy.warmup_samples: 0"


@register_strategy("rmt")
class RMT(AdaptingStrategy):
    """Robust Mean Teacher: self-training, prototype contrast and source replay (Döbler et al. 2023).

    Args:
        backbone: the source model's feature extractor.
        online: the test-time optimizer and the adapted parameters, written flat (``lr``, ``params``, ...); RMT adapts every weight and bias (``params: all``).
        ema_momentum: the mean teacher's momentum ``alpha``.
        flip: horizontal-flip probability of the augmentation (0 for digits-like data).
        lambda_ce_trg: weight of the self-training loss.
        lambda_cont: weight of the contrastive loss (0: no prototypes; the projection head stays unused).
        lambda_ce_src: weight of the cross-entropy on replayed source batches (0: no replay).
        warmup_samples: source images of the mean-teacher warm-up (0: none).
        source_batch_size: batch size of the prototype pass, the warm-up and source replay (default: the test batch size).
        temperature: temperature of the contrastive loss.
        projection_dim: width of the projection head.
    """

    @flat_options
    def __init__(
        self,
        backbone,
        online: AdaptationOptions = AdaptationOptions(params="all"),
        ema_momentum: Annotated[float, Field(ge=0, le=1)] = 0.999,
        flip: Annotated[float, Field(ge=0, le=1)] = 0.5,
        lambda_ce_trg: Annotated[float, Field(ge=0)] = 1.0,
        lambda_cont: Annotated[float, Field(ge=0)] = 1.0,
        lambda_ce_src: Annotated[float, Field(ge=0)] = 1.0,
        warmup_samples: Annotated[int, Field(ge=0)] = 50000,
        source_batch_size: Annotated[int, Field(ge=1)] | None = None,
        temperature: Annotated[float, Field(gt=0)] = 0.1,
        projection_dim: Annotated[int, Field(ge=1)] = 128,
    ):
        super().__init__(backbone, online)
        self.lambda_ce_trg = lambda_ce_trg
        self.lambda_cont = lambda_cont
        self.lambda_ce_src = lambda_ce_src
        self.warmup_samples = warmup_samples
        self.teacher = EMATeacher(classifier(backbone, self.head), ema_momentum)
        self.augment = TTAugment(flip=flip)
        self.source_batch_size = source_batch_size
        self.source_batches = SourceBatches(source_batch_size)
        self.contrast = PrototypeContrast(backbone.feature_dim, projection_dim, temperature)

    @property
    def uses_source_data(self) -> bool:
        return self.lambda_cont > 0 or self.lambda_ce_src > 0 or self.warmup_samples > 0

    def prepare_adaptation(self, exp: Experience) -> None:
        source = source_training_data(exp, "rmt", NO_SOURCE_DATA) if self.uses_source_data else None
        if source is not None:
            self.source_batches.batch_size = self.source_batch_size or self._data.batch_size
            self.source_batches.attach(source)
        self.adaptation.prepare(
            self,
            classifier(self.backbone, self.head),
            on_start=lambda: self._start(source),
            extra=self.contrast.projector.parameters() if self.lambda_cont > 0 else (),
        )

    def _start(self, source: DataView | None) -> None:
        """Teacher = source model; source prototypes; mean-teacher warm-up (sections 3.2-3.3)."""
        self.teacher.reset(classifier(self.backbone, self.head))
        use_batch_statistics(batch_norm_layers(self.teacher))
        if source is None:
            return
        self.source_batches.start(source)
        if self.lambda_cont > 0:
            batches = self.batches(source, self.source_batches.batch_size, shuffle=True)
            self.contrast.compute_prototypes(((self.backbone(b.x), b.y) for b in batches), self.head.n_classes)
        self._warm_up()

    def _warm_up(self) -> None:
        steps = self.warmup_samples // self.source_batches.batch_size
        student = classifier(self.backbone, self.head)
        for step in range(steps):
            self.adaptation.optimizer.scale_lr((step + 1) / steps)
            x = self.source_batches.next(self).x
            with torch.no_grad():
                target = self.teacher(x)
            with torch.enable_grad():
                self.adaptation.step(symmetric_cross_entropy(student(x), target).mean())
            self.teacher.update(student)
        if steps:
            self.adaptation.optimizer.scale_lr(1.0)

    def adapt(self, x: torch.Tensor) -> torch.Tensor:
        self.adaptation.begin_batch(self)
        features = self.backbone(x)
        features_aug = self.backbone(self.augment(x))
        logits, logits_aug = self.head(features), self.head(features_aug)
        with torch.no_grad():
            target = self.teacher(x)
        loss = (
            self.lambda_ce_trg * (0.5 * symmetric_cross_entropy(logits, target) + 0.5 * symmetric_cross_entropy(logits_aug, target)).mean()
        )
        if self.lambda_cont > 0:
            loss = loss + self.lambda_cont * self.contrast(features, features_aug)
        if self.lambda_ce_src > 0:
            batch = self.source_batches.next(self)
            loss = loss + self.lambda_ce_src * F.cross_entropy(self.head(self.backbone(batch.x)), batch.y)
        self.adaptation.step(loss)
        self.teacher.update(classifier(self.backbone, self.head))
        return logits.detach() + target

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # checkpoints from before the prototypes and projection head moved into ``contrast``
        for key in [k for k in state_dict if k.startswith((f"{prefix}prototypes.", f"{prefix}projector."))]:
            state_dict[f"{prefix}contrast.{key[len(prefix) :]}"] = state_dict.pop(key)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
