"""SLCA: Slow Learner with Classifier Alignment.

Zhang, Wang, Kang, Chen & Wei, "SLCA: Slow Learner with Classifier Alignment for Continual
Learning on a Pre-trained Model", ICCV 2023 (https://arxiv.org/abs/2303.05118; code:
github.com/GengDavid/SLCA).

* **Slow learner** -- the whole pre-trained backbone trains with a learning rate ``x0.01``
  of the head's (``bcb_lrscale`` in the official code): ``lr_backbone = lr * backbone_lr_scale``.
  The head trains on the current task's classes only (cross-entropy on ``logits[:, known:]``,
  older heads frozen); new rows start as in the official ``SimpleContinualLinear``
  (truncated normal, std 0.02, bias 0).
* **Classifier alignment** -- after each task, every new class's feature mean and covariance
  are computed once (eval mode, no gradient) and kept; from the second task on, a copy of the
  head is re-trained on features sampled from every seen class's Gaussian with logit
  normalisation (:class:`~clpeft.components.classifier_alignment.ClassifierAlignment`).
  The aligned copy predicts; the next task trains the unaligned head (the official
  ``fc.backup()`` / ``fc.recall()``), and each alignment starts again from it.

``backbone_lr_scale: 0`` freezes the backbone (the official ``fix_bcb``): features are then
cached. Not reproduced: the multi-step learning-rate decay of the first stage (x0.1 at epoch
18 of 20; the engine's learning rate is constant), and weight decay also reaches the frozen
old head rows (they get no gradient, only the decay).

Paper symbols -> parameters: backbone learning-rate scale -> ``backbone_lr_scale``; sampled
features per class -> ``align_samples``; logit-normalisation temperature ``tau`` ->
``align_temperature``.
"""

from __future__ import annotations

import copy
from typing import Annotated

import torch
from pydantic import Field

from clpeft.components.class_statistics import ClassStatistics
from clpeft.components.classifier_alignment import ClassifierAlignment
from clpeft.components.heads import LinearHead
from clpeft.components.prompted_classifier import ClassMask
from clpeft.data import Batch
from clpeft.experience import Experience
from clpeft.registry import register_strategy
from clpeft.strategy import Strategy


@register_strategy("slca")
class SLCA(Strategy):
    """SLCA: slow-learning backbone, classifier aligned on sampled class-Gaussian features (Zhang et al. 2023).

    Args:
        backbone: the pre-trained feature extractor (unfrozen unless ``backbone_lr_scale`` is 0).
        backbone_lr_scale: the backbone's learning rate as a fraction of ``train.lr``.
        align: re-train the head on sampled features after every task but the first.
        align_epochs: alignment epochs (``ca_epochs``).
        align_samples: features sampled per class and epoch (``num_sampled_pcls``).
        align_lr: SGD learning rate of the alignment.
        align_temperature: ``tau`` of the logit normalisation (``ca_with_logit_norm``); 0 turns it off.
        mean_shrink: the official code's shrinkage of older tasks' sampling means (0: none).
        train_mask: restrict the cross-entropy to the current task's classes.
    """

    def __init__(
        self,
        backbone,
        backbone_lr_scale: Annotated[float, Field(ge=0)] = 0.01,
        align: bool = True,
        align_epochs: Annotated[int, Field(ge=1)] = 5,
        align_samples: Annotated[int, Field(ge=1)] = 256,
        align_lr: Annotated[float, Field(gt=0)] = 0.01,
        align_temperature: Annotated[float, Field(ge=0)] = 0.1,
        mean_shrink: Annotated[float, Field(ge=0, le=1)] = 0.1,
        train_mask: bool = True,
    ):
        super().__init__(backbone)
        self.backbone_lr_scale = backbone_lr_scale
        if backbone_lr_scale > 0:
            backbone.requires_grad_(True)
        else:
            backbone.freeze()
        self.align = align
        self.alignment = ClassifierAlignment(backbone.feature_dim, align_samples, align_epochs, align_lr,
                                             temperature=align_temperature or None, mean_shrink=mean_shrink)
        self.aligned_head = LinearHead(backbone.feature_dim).requires_grad_(False)
        self.mask = ClassMask(train_mask)

    def before_experience(self, exp: Experience) -> None:
        known = self.head.n_classes
        super().before_experience(exp)
        with torch.no_grad():
            torch.nn.init.trunc_normal_(self.head.weight[known:], std=0.02)
            self.head.bias[known:] = 0.0
        self.mask.start(exp.classes_in_this_experience)

    def param_groups(self, lr: float) -> list[dict]:
        """The slow learner: backbone at ``lr * backbone_lr_scale``, head at ``lr``."""
        backbone = [p for p in self.backbone.parameters() if p.requires_grad]
        return [{"params": backbone, "lr": lr * self.backbone_lr_scale}, {"params": list(self.head.parameters()), "lr": lr}]

    def training_step(self, batch: Batch) -> torch.Tensor:
        return self.mask.loss(self.head(self.embed(batch.x)), batch.y)

    @torch.no_grad()
    def after_experience(self, exp: Experience) -> None:
        share = ClassStatistics(self.alignment.stats.dim, covariance="per_class").to(self.alignment.stats.mean.device)
        for batch in self.batches(exp.train, shard=True):
            share.update(self.embed(batch.x).float(), batch.y)
        self.alignment.add(share.gathered(), exp.index)
        n_tasks = int(self.alignment.task_of_class.max()) + 1
        if self.align and n_tasks > 1:
            aligned = copy.deepcopy(self.head).requires_grad_(True)
            seed = int(torch.randint(2**62, (), dtype=torch.long))  # the engine seeds each experience
            generator = torch.Generator(self.alignment.stats.mean.device).manual_seed(seed)
            self.alignment.align(aligned, generator)
            self.aligned_head.load_state_dict(aligned.state_dict())

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of the aligned head once it covers every class seen, else of the trained head."""
        features = self.embed(x)
        if self.aligned_head.n_classes == self.head.n_classes:
            return self.aligned_head(features)
        return self.head(features)
