"""CoFiMA: SLCA's slow learner and classifier alignment, plus Fisher-weighted averaging of each task's model with the previous one.

Marouf, Roy, Tartaglione & Lathuilière, "Weighted Ensemble Models Are Strong Continual Learners",
ECCV 2024 (https://arxiv.org/abs/2312.08977; code: LAMDA-PILOT ``models/cofima.py``).

1. task ``t`` trains as SLCA (Zhang et al., ICCV 2023): the whole backbone at ``x0.01`` the
   head's learning rate, cross-entropy on the current classes' logits, older rows fixed, new
   rows truncated-normal (std 0.02);
2. the diagonal Fisher ``F_t`` of the trained model (the mean over the task's batches of the
   squared gradient of the batch's cross-entropy over every seen class, clipped at
   ``fisher_max``; the model in training mode), then the backbone is averaged with the previous
   task's averaged backbone (eq. 4-5, ``lambda`` = ``merge_weight``):
   :mod:`clpeft.components.regularization.fisher_averaging`;
3. every new class's feature statistics are taken with the averaged backbone and a copy of the
   head is aligned on features sampled from every class's Gaussian (SLCA's classifier
   alignment, :class:`~clpeft.components.heads.head_training.HeadTraining`), which predicts.

Stored beyond SLCA: the previous averaged backbone and its Fisher (two backbone-sized tensors
sets; PILOT keeps every task's). Costs per task: one more pass over the task's training data
with backward (the Fisher).

Checked against PILOT's ``models/cofima.py`` in ``tests/reference/test_pilot_breadth.py``: the
slow learner's steps over two tasks, both tasks' Fishers and the averaged backbone. PILOT also
averages the classifier (``interpolate_weights`` over the whole state dict), but only to give
its alignment a starting point (``fc.recall()`` then restores the trained head): its new rows
come out as ``F_t theta_t`` (a key only the new model has is multiplied by its Fisher, <= 1e-4,
not averaged) and its old rows are weighted by stale gradients of frozen heads; here, as in
SLCA, the alignment starts from the trained head. PILOT's Fisher pass reads the augmented,
shuffled training loader; here the engine's un-augmented batches.

Paper symbols -> parameters: ``lambda`` -> ``merge_weight``; the slow learner's scale ->
``backbone_lr_scale``; alignment as SLCA's (``align_*``, ``mean_shrink``).
"""

from __future__ import annotations

from typing import Annotated

import torch
import torch.nn.functional as F
from pydantic import Field

from clpeft.components.heads.head_training import HeadOptions
from clpeft.components.heads.slow_learner_classifier import AlignmentOptions, SlowLearnerClassifier
from clpeft.components.regularization.fisher_averaging import TensorSnapshot, batch_fisher, fisher_weighted_average
from clpeft.experience import Experience
from clpeft.registry import register_strategy
from clpeft.schema import flat_options


@register_strategy("cofima")
class CoFiMA(SlowLearnerClassifier):
    """CoFiMA: SLCA plus Fisher-weighted averaging of consecutive tasks' backbones (Marouf et al. 2024).

    Args:
        backbone: the pre-trained feature extractor (trained slowly).
        backbone_lr_scale: the backbone's learning rate as a fraction of ``train.lr`` (PILOT's ``bcb_lrscale``).
        merge_weight: ``lambda``, the weight of the new task's model (``wt_lambda``).
        fisher_weighting: weight the average by the Fisher (``fisher_weighting``); off: plain average.
        fisher_max: the Fisher's clipping value (PILOT's ``fishermax``).
        alignment: SLCA's alignment, ``align_epochs``, ``align_samples``, ``align_lr`` (PILOT:
            ``lrate``), ``align_temperature``, ``mean_shrink``, as flat keys
            (:class:`~clpeft.components.heads.slow_learner_classifier.AlignmentOptions`).
        head_options: ``train_mask``, ``align``, ``drift_compensation`` as flat keys
            (:class:`~clpeft.components.heads.HeadOptions`).
    """

    supported_scenarios = ("class_incremental",)

    @flat_options
    def __init__(
        self,
        backbone,
        backbone_lr_scale: Annotated[float, Field(gt=0)] = 0.01,
        merge_weight: Annotated[float, Field(ge=0, le=1)] = 0.4,
        fisher_weighting: bool = True,
        fisher_max: Annotated[float, Field(gt=0)] = 1e-4,
        alignment: AlignmentOptions = AlignmentOptions(align_epochs=3),
        head_options: HeadOptions = HeadOptions(align=True),
    ):
        super().__init__(backbone, backbone_lr_scale, head_options, alignment)
        self.merge_weight, self.fisher_weighting, self.fisher_max = merge_weight, fisher_weighting, fisher_max
        self.previous = TensorSnapshot()  # the previous task's averaged backbone
        self.previous_fisher = TensorSnapshot()  # its Fisher (taken before it was averaged)

    def fisher(self, exp: Experience) -> dict[str, torch.Tensor]:
        """``F_t`` of the backbone: cross-entropy over every seen class, the model in training mode."""
        params = {n: p for n, p in self.backbone.named_parameters() if p.requires_grad}
        was_training = self.training
        self.train()
        with torch.enable_grad():
            losses = (F.cross_entropy(self.head(self.embed(batch.x)), batch.y) for batch in self.batches(exp.train))
            fisher = batch_fisher(params, losses, self.fisher_max)
        self.train(was_training)
        return fisher

    def consolidate(self, exp: Experience) -> None:
        """Average the trained backbone with the previous task's (eq. 4-5), then keep both for the next task."""
        current = {n: p for n, p in self.backbone.named_parameters() if p.requires_grad}
        fisher = self.fisher(exp) if self.fisher_weighting else None
        if not self.previous.is_empty():
            averaged = fisher_weighted_average(
                self.previous.tensors(), current, self.merge_weight, self.previous_fisher.tensors() if fisher is not None else None, fisher
            )
            with torch.no_grad():
                for name, p in current.items():
                    p.copy_(averaged[name])
        self.previous.store(current)
        if fisher is not None:
            self.previous_fisher.store(fisher)
