"""SLCA's training as a base class: a slowly trained backbone, a head aligned on class-Gaussian features.

Zhang, Wang, Kang, Chen & Wei, "SLCA: Slow Learner with Classifier Alignment for Continual
Learning on a Pre-trained Model", ICCV 2023 (https://arxiv.org/abs/2303.05118), sections 4.1-4.2.
The methods built on SLCA's training (SLCA itself, CoFiMA) subclass :class:`SlowLearnerClassifier`
and add what happens between a task's training and its alignment
(:meth:`SlowLearnerClassifier.consolidate`; CoFiMA averages the backbone there).
"""

from __future__ import annotations

import torch
from pydantic import Field

from clpeft.components.heads.head_training import HeadOptions, HeadTraining
from clpeft.components.heads.slow_learner import SlowLearnerHead, slow_learner_groups
from clpeft.data import Batch
from clpeft.experience import Experience
from clpeft.schema import Options
from clpeft.strategy import Strategy


class AlignmentOptions(Options):
    """SLCA's classifier alignment (section 4.2): how the head's copy is re-trained on sampled features."""

    align_epochs: int = Field(5, ge=1, description="alignment epochs (SLCA's ``ca_epochs``).")
    align_samples: int = Field(256, ge=1, description="features sampled per class and epoch (``num_sampled_pcls``).")
    align_lr: float = Field(0.01, gt=0, description="SGD learning rate of the alignment.")
    align_temperature: float = Field(0.1, ge=0, description="``tau`` of the logit normalisation (``ca_with_logit_norm``); 0 turns it off.")
    mean_shrink: float = Field(0.1, ge=0, le=1, description="shrinkage of older tasks' sampling means (SLCA's code; 0: none).")


class SlowLearnerClassifier(Strategy):
    """SLCA's slow learner and classifier alignment (base class).

    * the trainable backbone learns at ``lr * backbone_lr_scale``, the head at ``lr``
      (:func:`~clpeft.components.heads.slow_learner.slow_learner_groups`); ``backbone_lr_scale``
      0 freezes the backbone;
    * each task's new head rows start truncated-normal and, with ``train_mask``, the older rows
      are put back after every optimizer step
      (:class:`~clpeft.components.heads.slow_learner.SlowLearnerHead`); the loss is the
      cross-entropy of the masked logits (:class:`~clpeft.components.heads.head_training.HeadTraining`);
    * after each task, :meth:`consolidate`, then the new classes' feature statistics and the
      alignment of a copy of the head, which predicts.

    Args:
        backbone: the pre-trained feature extractor.
        backbone_lr_scale: the backbone's learning rate as a fraction of ``train.lr`` (0: frozen).
        head_options: the head's :class:`~clpeft.components.heads.head_training.HeadOptions`.
        alignment: the alignment's :class:`AlignmentOptions`.
    """

    def __init__(self, backbone, backbone_lr_scale: float, head_options: HeadOptions, alignment: AlignmentOptions):
        super().__init__(backbone)
        self.backbone_lr_scale = backbone_lr_scale
        if backbone_lr_scale > 0:
            backbone.requires_grad_(True)
        else:
            backbone.freeze()
        self.aligned = HeadTraining(
            backbone.feature_dim,
            head_options,
            samples_per_class=alignment.align_samples,
            epochs=alignment.align_epochs,
            lr=alignment.align_lr,
            temperature=alignment.align_temperature or None,
            mean_shrink=alignment.mean_shrink,
        )
        self.rows = SlowLearnerHead()

    def _head_features(self, batch: Batch) -> torch.Tensor:
        return self.embed(batch.x)

    def before_experience(self, exp: Experience) -> None:
        self.aligned.start(exp, self.batches, self._head_features)
        self.rows.start(self.head, exp.n_classes_seen, hold_old_rows=self.aligned.mask.enabled)

    def param_groups(self, lr: float) -> list[dict]:
        """The slow learner: backbone at ``lr * backbone_lr_scale``, head at ``lr``."""
        return slow_learner_groups(self.backbone, self.head, lr, self.backbone_lr_scale)

    def training_step(self, batch: Batch) -> torch.Tensor:
        return self.aligned.loss(self.head(self.embed(batch.x)), batch.y)

    def after_training_step(self) -> bool:
        """Put the older classes' rows back: the step's weight decay (and momentum) moved them."""
        self.rows.restore(self.head)
        return False

    def consolidate(self, exp: Experience) -> None:
        """Between a task's training and its classifier alignment (nothing in SLCA)."""

    def after_experience(self, exp: Experience) -> None:
        self.rows.finish()
        self.consolidate(exp)
        self.aligned.finish(self.head, exp, self.batches, self._head_features)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of the aligned head once it covers every class seen, else of the trained head."""
        return self.aligned(self.embed(x), self.head)
