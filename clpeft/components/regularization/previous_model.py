"""The model as it was before an experience: the teacher that distillation methods query.

LwF (Li & Hoiem, ECCV 2016, https://arxiv.org/abs/1606.09282), iCaRL (Rebuffi et al., CVPR 2017,
https://arxiv.org/abs/1611.07725), BiC, WA and LUCIR all compare the current outputs with those of
the model frozen at the start of the experience. Only what trains needs a copy: with a frozen
backbone (or cached features) the old features are the current ones and only the head is copied.
"""

from __future__ import annotations

import torch
from torch import nn

from clpeft.components.regularization.distillation import frozen_copy


class PreviousModel:
    """A frozen copy of a head, and of its backbone when the backbone trains on raw inputs.

    Not a module on purpose: it is rebuilt by ``before_experience`` and never checkpointed.

    Args:
        head: the head to copy (before it grows for the new classes).
        backbone: the backbone to copy, or ``None`` when the current features can be reused.
    """

    def __init__(self, head: nn.Module, backbone: nn.Module | None = None):
        self.head = frozen_copy(head)
        self.backbone = None if backbone is None else frozen_copy(backbone)

    @classmethod
    def of(cls, strategy) -> PreviousModel | None:
        """The teacher of ``strategy`` (a :class:`clpeft.Strategy`), or ``None`` before its first classes."""
        if strategy.head.n_classes == 0:
            return None
        trains_backbone = not strategy.uses_features and not strategy.backbone.frozen
        return cls(strategy.head, strategy.backbone if trains_backbone else None)

    @torch.no_grad()
    def features(self, x: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """The old model's features of the batch ``x`` whose current features are ``features``."""
        return features if self.backbone is None else self.backbone(x)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """The old model's logits of the batch ``x`` (over the classes it knew)."""
        return self.head(self.features(x, features))
