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

from pydantic import Field
from torch import nn

from clpeft.components.heads.head_training import HeadOptions
from clpeft.components.heads.slow_learner_classifier import AlignmentOptions, SlowLearnerClassifier
from clpeft.components.prompts.prompted import promptable_width
from clpeft.registry import register_strategy
from clpeft.schema import flat_options


@register_strategy("slca")
class SLCA(SlowLearnerClassifier):
    """SLCA: slow-learning backbone, classifier aligned on sampled class-Gaussian features (Zhang et al. 2023).

    Args:
        backbone: the pre-trained feature extractor (unfrozen unless ``backbone_lr_scale`` is 0).
        backbone_lr_scale: the backbone's learning rate as a fraction of ``train.lr``.
        alignment: ``align_epochs`` (``ca_epochs``), ``align_samples`` (``num_sampled_pcls``),
            ``align_lr``, ``align_temperature`` (``tau``) and ``mean_shrink`` as flat keys
            (:class:`~clpeft.components.heads.slow_learner_classifier.AlignmentOptions`).
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
        alignment: AlignmentOptions = AlignmentOptions(),  # noqa: B008 (immutable: pyproject should list it)
        reset_final_norm: bool = False,
        head_options: HeadOptions = HeadOptions(align=True),
    ):
        if reset_final_norm:
            backbone.net.norm = nn.LayerNorm(promptable_width(backbone, "slca (reset_final_norm)"))
        super().__init__(backbone, backbone_lr_scale, head_options, alignment)
