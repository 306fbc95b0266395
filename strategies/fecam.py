"""FeCAM: a Mahalanobis classifier with shrunk, normalised per-class covariances on frozen features.

Goswami, Liu, Twardowski & van de Weijer, "FeCAM: Exploiting the Heterogeneity of Class
Distributions in Exemplar-Free Continual Learning", NeurIPS 2023 (https://arxiv.org/abs/2309.14062;
code: dipamgoswami/FeCAM and LAMDA-PILOT ``models/fecam.py``).

1. optionally adapt on the first experience, then freeze (LAMDA-PILOT's FeCAM: AdaptFormer
   adapters and a cosine head, as RanPAC's and APER's first session; see
   :class:`~clpeft.components.heads.frozen_feature_classifier.FrozenFeatureClassifier`);
2. after every experience, the mean ``mu_c`` and covariance ``Sigma_c`` (unbiased) of each new
   class's frozen features; nothing else is kept, no exemplar;
3. predict ``argmin_c d_c(x)``, the Mahalanobis distance of the unit-length feature to the
   unit-length mean under ``N(S(Sigma_c))^+`` (eq. 4, shrinkage eq. 6, normalisation Sec. 4.2):
   :class:`~clpeft.components.heads.mahalanobis.MahalanobisHead`.

Checked against PILOT's ``models/fecam.py`` in ``tests/reference/test_pilot_breadth.py``: the
adapter steps, the class means, the covariances and the distances. PILOT's FeCAM differs from
the paper's: ``S(Sigma) = Sigma + 100 I`` (``ridge: 100``, ``shrinkage_diagonal`` and
``shrinkage_off_diagonal`` 0) and ``torch.corrcoef`` of that matrix (``normalisation:
corrcoef``); the published configs (``configs/fecam/``) run PILOT's, the defaults the paper's
(``g1 = g2 = 1``, correlation). The paper's Tukey transform of ReLU features is not applied
(ViT features take negative values; the paper's ViT runs leave it out too).

Costs: one pass of each experience's training data through the frozen backbone (cached);
stored: ``C (D + D^2)`` float64 statistics and as much again for the fitted precisions.

Paper symbols -> parameters: ``gamma_1`` -> ``shrinkage_diagonal``, ``gamma_2`` ->
``shrinkage_off_diagonal``.
"""

from __future__ import annotations

from typing import Annotated

from pydantic import Field

from clpeft.components.heads.class_statistics import ClassStatistics
from clpeft.components.heads.classifiers import CosineHead
from clpeft.components.heads.frozen_feature_classifier import AdaptPart, FrozenFeatureClassifier
from clpeft.components.heads.mahalanobis import MahalanobisHead, Normalisation
from clpeft.registry import register_strategy


@register_strategy("fecam")
class FeCAM(FrozenFeatureClassifier):
    """FeCAM: per-class Mahalanobis distance with shrunk, normalised covariances (Goswami et al. 2023).

    Args:
        backbone: the feature extractor (frozen by the strategy after optional adaptation).
        shrinkage_diagonal: ``gamma_1``, times the mean variance added to the diagonal (eq. 6).
        shrinkage_off_diagonal: ``gamma_2``, times the mean covariance added off the diagonal (eq. 6).
        ridge: added to the diagonal after shrinkage (PILOT's FeCAM: 100, with both gammas 0).
        normalisation: ``correlation`` (the paper), ``corrcoef`` (PILOT's ``torch.corrcoef`` of
            the shrunk covariance) or ``none``.
        adapt: first-experience adaptation: ``adapter`` (PILOT: AdaptFormer adapters and a
            cosine head), ``none``, ``full`` or ``last_blocks``.
        adapt_blocks: blocks fine-tuned by ``last_blocks``.
        adapter_bottleneck: the adapters' hidden width (PILOT's ``ffn_num``).
    """

    def __init__(
        self,
        backbone,
        shrinkage_diagonal: Annotated[float, Field(ge=0)] = 1.0,
        shrinkage_off_diagonal: Annotated[float, Field(ge=0)] = 1.0,
        ridge: Annotated[float, Field(ge=0)] = 0.0,
        normalisation: Normalisation = "correlation",
        adapt: AdaptPart = "none",
        adapt_blocks: Annotated[int, Field(ge=1)] = 1,
        adapter_bottleneck: Annotated[int, Field(ge=1)] = 64,
    ):
        dim = backbone.feature_dim
        head = MahalanobisHead(
            dim, diagonal=shrinkage_diagonal, off_diagonal=shrinkage_off_diagonal, ridge=ridge, normalisation=normalisation
        )
        super().__init__(
            backbone,
            head,
            ClassStatistics(dim, covariance="per_class"),
            adapt,
            adapt_blocks,
            adapt_head=CosineHead(dim) if adapt != "none" else None,
            adapter_bottleneck=adapter_bottleneck,
        )

    def fit_head(self) -> None:
        self.head.fit(self.stats)
