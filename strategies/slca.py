"""SLCA: Slow Learner with Classifier Alignment.

Zhang, Wang, Kang, Chen & Wei, "SLCA: Slow Learner with Classifier Alignment for Continual
Learning on a Pre-trained Model", ICCV 2023 (https://arxiv.org/abs/2303.05118; code:
github.com/GengDavid/SLCA).

* **Slow learner** -- the whole pre-trained backbone trains with a learning rate ``x0.01``
  of the head's (``bcb_lrscale`` in the official code): ``lr_backbone = lr * backbone_lr_scale``.
  The head trains on the current task's classes only (cross-entropy on ``logits[:, known:]``);
  older rows stay exactly as they were (the official code freezes the older heads, so neither
  gradient nor weight decay reaches them: here they are put back after every optimizer step;
  ``train_mask: false`` trains every row on all logits instead);
  new rows start as in the official ``SimpleContinualLinear`` (truncated normal, std 0.02,
  bias 0).
* **Classifier alignment** -- after each task, every new class's feature mean and covariance
  are computed once (eval mode, no gradient) and kept; from the second task on, a copy of the
  head is re-trained on features sampled from every seen class's Gaussian with logit
  normalisation (:class:`~clpeft.components.heads.alignment.AlignedHead`).
  The aligned copy predicts; the next task trains the unaligned head (the official
  ``fc.backup()`` / ``fc.recall()``), and each alignment starts again from it.

``backbone_lr_scale: 0`` freezes the backbone (the official ``fix_bcb``): features are then
cached. The first stage's learning-rate decay (x0.1 at epoch 18 of 20) is the configs'
``train.schedule: multistep``. The official ViT-B/16 (``convs/vits.py``
``vit_base_patch16_224_in21k``) replaces the pre-trained final LayerNorm by a fresh one
(weight 1, bias 0, eps 1e-5): ``reset_final_norm: true``.

Checked against the official ``models/slca.py`` in ``tests/reference/test_slca.py``: the
optimizer groups and the weights after the slow learner's steps over two tasks, the class
means and covariances, and the aligned head after the alignment epochs given the same sampled
features and shuffles.

Paper symbols -> parameters: backbone learning-rate scale -> ``backbone_lr_scale``; sampled
features per class -> ``align_samples``; logit-normalisation temperature ``tau`` ->
``align_temperature``.
"""

from __future__ import annotations

from typing import Annotated

import torch
from pydantic import Field
from torch import nn

from clpeft.components.heads.head_training import HeadOptions, HeadTraining
from clpeft.components.heads.slow_learner import SlowLearnerHead, slow_learner_groups
from clpeft.components.prompts.prompted import promptable_width
from clpeft.data import Batch
from clpeft.experience import Experience
from clpeft.registry import register_strategy
from clpeft.schema import flat_options
from clpeft.strategy import Strategy


@register_strategy("slca")
class SLCA(Strategy):
    """SLCA: slow-learning backbone, classifier aligned on sampled class-Gaussian features (Zhang et al. 2023).

    Args:
        backbone: the pre-trained feature extractor (unfrozen unless ``backbone_lr_scale`` is 0).
        backbone_lr_scale: the backbone's learning rate as a fraction of ``train.lr``.
        align_epochs: alignment epochs (``ca_epochs``).
        align_samples: features sampled per class and epoch (``num_sampled_pcls``).
        align_lr: SGD learning rate of the alignment.
        align_temperature: ``tau`` of the logit normalisation (``ca_with_logit_norm``); 0 turns it off.
        mean_shrink: the official code's shrinkage of older tasks' sampling means (0: none).
        head_options: ``train_mask`` (the current task's classes only, older rows kept fixed, as
            the official code; ``false`` trains every row on all logits), ``align`` (on: re-train
            the head on sampled features after every task but the first) and
            ``drift_compensation`` (SDC, not in SLCA), as flat keys
            (:class:`~clpeft.components.heads.HeadOptions`).
        reset_final_norm: replace a timm ViT's pre-trained final LayerNorm by a fresh one, as
            the official code's backbone does.
    """

    @flat_options
    def __init__(
        self,
        backbone,
        backbone_lr_scale: Annotated[float, Field(ge=0)] = 0.01,
        align_epochs: Annotated[int, Field(ge=1)] = 5,
        align_samples: Annotated[int, Field(ge=1)] = 256,
        align_lr: Annotated[float, Field(gt=0)] = 0.01,
        align_temperature: Annotated[float, Field(ge=0)] = 0.1,
        mean_shrink: Annotated[float, Field(ge=0, le=1)] = 0.1,
        reset_final_norm: bool = False,
        head_options: HeadOptions = HeadOptions(align=True),
    ):
        super().__init__(backbone)
        if reset_final_norm:
            backbone.net.norm = nn.LayerNorm(promptable_width(backbone, "slca (reset_final_norm)"))
        self.backbone_lr_scale = backbone_lr_scale
        if backbone_lr_scale > 0:
            backbone.requires_grad_(True)
        else:
            backbone.freeze()
        self.aligned = HeadTraining(
            backbone.feature_dim,
            head_options,
            samples_per_class=align_samples,
            epochs=align_epochs,
            lr=align_lr,
            temperature=align_temperature or None,
            mean_shrink=mean_shrink,
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

    def after_experience(self, exp: Experience) -> None:
        self.rows.finish()
        self.aligned.finish(self.head, exp, self.batches, self._head_features)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of the aligned head once it covers every class seen, else of the trained head."""
        return self.aligned(self.embed(x), self.head)
