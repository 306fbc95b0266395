"""Contrast of test features with their nearest source prototype, through a projection head (RMT, SANTA).

Döbler et al., "Robust Mean Teacher for Continual and Gradual Test-Time Adaptation", CVPR 2023
(https://arxiv.org/abs/2211.13081), eq. 4, and Chakrabarty et al., "SANTA: Source Anchoring
Network and Target Alignment for Continual Test Time Adaptation", TMLR 2023
(https://openreview.net/forum?id=V7guVYzvE4): the source prototypes are the class means of the
source model's features; a test image's features, those of its augmentation and its nearest
source prototype (cosine) are three views of one sample, mapped by a projection head (two linear
layers with a ReLU) into the space of the multi-view contrastive loss
(:func:`multi_view_contrastive_loss`, temperature ``tau``).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from clpeft.components.heads.class_statistics import ClassStatistics
from clpeft.components.tta.losses import multi_view_contrastive_loss


class PrototypeContrast(nn.Module):
    """Source prototypes, a projection head and the contrastive loss of test and augmented features.

    Args:
        feature_dim: width of the backbone's features.
        projection_dim: width of the projection head (128 in both papers' code).
        temperature: ``tau`` of the contrastive loss.

    The prototypes (:class:`ClassStatistics` means) and the head are part of the ``state_dict``;
    the head's parameters are the caller's to optimise.
    """

    def __init__(self, feature_dim: int, projection_dim: int = 128, temperature: float = 0.1):
        super().__init__()
        self.temperature = temperature
        self.prototypes = ClassStatistics(feature_dim, covariance="none")
        self.projector = nn.Sequential(nn.Linear(feature_dim, projection_dim), nn.ReLU(), nn.Linear(projection_dim, projection_dim))

    @torch.no_grad()
    def compute_prototypes(self, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], n_classes: int, limit: int | None = None) -> None:
        """Class means of the ``(features, labels)`` batches (a new set); stop after the batch
        that passes ``limit`` samples (SANTA's code: 100,000)."""
        self.prototypes = ClassStatistics(self.prototypes.dim, n_classes, "none").to(self.prototypes.counts.device)
        for features, labels in batches:
            self.prototypes.update(features, labels)
            if limit is not None and self.prototypes.counts.sum() > limit:
                break

    def forward(self, features: torch.Tensor, features_aug: torch.Tensor) -> torch.Tensor:
        """The contrastive loss of (nearest prototype, ``features``, ``features_aug``) per sample."""
        prototypes = self.prototypes.means().to(features.dtype)
        with torch.no_grad():
            nearest = (F.normalize(features, dim=1) @ F.normalize(prototypes, dim=1).T).argmax(1)
        views = torch.stack([prototypes[nearest], features, features_aug], dim=1)
        z = F.normalize(self.projector(views), dim=-1)
        return multi_view_contrastive_loss(z, self.temperature)
