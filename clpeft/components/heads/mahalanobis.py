"""FeCAM's classifier: a Mahalanobis distance to every class with its own shrunk, normalised covariance.

Goswami, Liu, Twardowski & van de Weijer, "FeCAM: Exploiting the Heterogeneity of Class
Distributions in Exemplar-Free Continual Learning", NeurIPS 2023 (https://arxiv.org/abs/2309.14062).
Class ``c`` keeps its mean ``mu_c`` and covariance ``Sigma_c``; a sample is scored by

    d_c(x) = (x^ - mu^_c)^T  N(S(Sigma_c))^+  (x^ - mu^_c)          (eq. 4; logit_c = -d_c)

with ``^`` the unit-length normalisation of features and means, ``+`` the pseudo-inverse, the
shrinkage ``S`` of eq. 6 (:func:`fecam_shrinkage`) and the normalisation ``N`` (Sec. 4.2):
``correlation`` (``Sigma_ij / sqrt(Sigma_ii Sigma_jj)``, the paper) or ``corrcoef`` (what
LAMDA-PILOT's ``models/fecam.py`` computes: ``torch.corrcoef`` of the matrix, i.e. the Pearson
correlation between its rows).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from clpeft.components.heads.classifiers import _ClosedFormHead, regularised_covariance

Normalisation = Literal["correlation", "corrcoef", "none"]


def fecam_shrinkage(covariance: torch.Tensor, diagonal: float = 1.0, off_diagonal: float = 1.0, ridge: float = 0.0) -> torch.Tensor:
    """``Sigma + g1 V1 I + g2 V2 (1 - I) + r I`` (FeCAM eq. 6, plus a ridge ``r``).

    ``V1`` is the mean of the diagonal (the mean variance), ``V2`` the mean of the off-diagonal
    entries that are not zero (the FeCAM authors' code); ``g1`` = ``diagonal`` and ``g2`` =
    ``off_diagonal`` are 1 in the paper. LAMDA-PILOT's FeCAM is ``g1 = g2 = 0, r = 100``.
    """
    d = covariance.shape[0]
    eye = torch.eye(d, dtype=covariance.dtype, device=covariance.device)
    off = covariance * (1 - eye)
    nonzero = off != 0
    v2 = off.sum() / nonzero.sum() if bool(nonzero.any()) else off.new_zeros(())
    shrunk = covariance + off_diagonal * v2 * (1 - eye)
    return regularised_covariance(shrunk, ridge=diagonal * float(torch.diagonal(covariance).mean()) + ridge)


def normalised(covariance: torch.Tensor, normalisation: Normalisation) -> torch.Tensor:
    """The covariance normalised as FeCAM's Sec. 4.2 (``correlation``) or PILOT's code (``corrcoef``)."""
    if normalisation == "correlation":
        sd = torch.diagonal(covariance).clamp_min(torch.finfo(covariance.dtype).tiny).sqrt()
        return covariance / (sd[:, None] * sd[None, :])
    if normalisation == "corrcoef":
        return torch.corrcoef(covariance)
    return covariance


class MahalanobisHead(_ClosedFormHead):
    """Per-class Mahalanobis classifier ``logit_c = -d_c(x)`` (FeCAM eq. 4; see the module docstring).

    Buffers per class: ``means`` (C, D), ``precision`` (C, D, D) = ``N(S(Sigma_c))^+`` and
    ``counts`` (C,), the sample count each class was fitted with (0: never fitted; such classes
    score ``-inf``). Memory: ``C D^2`` float64 (ViT-B, 200 classes: 0.9 GB), as the per-class
    covariances it is fitted from.

    Args:
        in_features: feature dimension ``D``.
        n_classes: initial number of classes.
        diagonal, off_diagonal: the shrinkage ``g1``, ``g2`` of eq. 6.
        ridge: ``r`` added to the diagonal after shrinkage.
        normalisation: ``correlation`` (the paper), ``corrcoef`` (PILOT) or ``none``.
        unit_features: normalise features and means to unit length (the paper and PILOT).
    """

    _class_buffers = ("means", "precision", "counts")

    def __init__(
        self,
        in_features: int,
        n_classes: int = 0,
        diagonal: float = 1.0,
        off_diagonal: float = 1.0,
        ridge: float = 0.0,
        normalisation: Normalisation = "correlation",
        unit_features: bool = True,
    ):
        super().__init__(in_features)
        self.precision = torch.zeros(0, in_features, in_features, dtype=torch.float64)
        self.counts = torch.zeros(0, dtype=torch.float64)
        self.grow_to(n_classes)
        self.diagonal, self.off_diagonal, self.ridge = diagonal, off_diagonal, ridge
        self.normalisation = normalisation
        self.unit_features = unit_features

    @torch.no_grad()
    def fit(self, stats) -> None:
        """Refit the classes whose sample count in ``stats`` (a per-class
        :class:`~clpeft.components.heads.class_statistics.ClassStatistics`) changed since the last fit."""
        self.grow_to(stats.n_classes)
        counts = stats.counts.to(self.counts.device)
        for c in torch.nonzero(counts != self.counts[: len(counts)]).flatten().tolist():
            shrunk = fecam_shrinkage(stats.covariance(c).to(self.precision), self.diagonal, self.off_diagonal, self.ridge)
            self.precision[c] = torch.linalg.pinv(normalised(shrunk, self.normalisation))
            self.means[c] = stats.mean[c].to(self.means)
            self.counts[c] = counts[c]

    def _unit(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.normalize(x, dim=-1) if self.unit_features else x

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        diff = self._unit(x)[:, None, :] - self._unit(self.means)[None]  # (N, C, D)
        distance = torch.einsum("ncd,cde,nce->nc", diff, self.precision, diff)
        return torch.where(self.counts > 0, -distance, torch.full_like(distance, float("-inf")))

    def extra_repr(self) -> str:
        return (
            f"{super().extra_repr()}, diagonal={self.diagonal}, off_diagonal={self.off_diagonal}, ridge={self.ridge}, "
            f"normalisation={self.normalisation!r}"
        )
