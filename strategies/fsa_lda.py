"""First Session Adaptation (FSA): fine-tune on the first experience only, then an LDA head.

Panos, Kobe, Reino, Aljundi & Turner, "First Session Adaptation: A Strong Replay-Free Baseline
for Class-Incremental Learning", ICCV 2023 (https://arxiv.org/abs/2303.13199).

1. first experience: the pre-trained body and a linear head (dropout 0.5 before it) train
   with cross-entropy (the authors: Adam, whole body);
2. the body is then frozen for good; after every experience the LDA head is recomputed
   exactly from all data seen so far (no replay: only running statistics are kept):
   ``logit_c = f^T S^-1 mu_c - 1/2 mu_c^T S^-1 mu_c`` with the class means ``mu_c`` and the
   shared covariance ``S = Sigma + r I``. The authors' code takes ``Sigma`` = the covariance
   of all features (``torch.cov``, unbiased) and ``r = 1``; ``covariance: within`` uses the
   pooled within-class covariance of textbook LDA, and ``shrinkage`` adds sklearn-style
   shrinkage towards a scaled identity.

Checked against the authors' ``methods/cil_trainer.py`` (``base_train``) and ``utils.py``
(``compute_lda_head``) in ``tests/reference/test_fsa.py``: the weights after the first
session's Adam steps, and the LDA logits after every experience.

Paper symbols: shrinkage/regulariser of the covariance -> ``ridge`` (and ``shrinkage``).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from clpeft.components.heads.class_statistics import ClassStatistics
from clpeft.components.heads.classifiers import LDAHead, LinearHead
from clpeft.components.heads.frozen_feature_classifier import AdaptPart, FrozenFeatureClassifier
from clpeft.registry import register_strategy


@register_strategy("fsa_lda")
class FSALDA(FrozenFeatureClassifier):
    """First Session Adaptation: fine-tune on the first experience only, then an exact LDA head (Panos et al. 2023).

    Args:
        backbone: the feature extractor.
        adapt: what the first experience fine-tunes: the ``full`` body (the paper), its
            ``last_blocks``, AdaptFormer ``adapter`` s in a ViT's blocks, or ``none`` (LDA on
            the pre-trained features).
        adapt_blocks: blocks fine-tuned by ``last_blocks``.
        dropout: dropout before the linear head during adaptation.
        covariance: ``total`` (covariance of all features, the authors' code) or pooled ``within``-class.
        ridge: ``r`` added to the covariance diagonal.
        shrinkage: sklearn-style shrinkage ``a`` towards ``tr(Sigma)/D * I``.
    """

    def __init__(
        self,
        backbone,
        adapt: AdaptPart = "full",
        adapt_blocks: Annotated[int, Field(ge=1)] = 1,
        dropout: Annotated[float, Field(ge=0, lt=1)] = 0.5,
        covariance: Literal["total", "within"] = "total",
        ridge: Annotated[float, Field(ge=0)] = 1.0,
        shrinkage: Annotated[float, Field(ge=0, le=1)] = 0.0,
    ):
        dim = backbone.feature_dim
        super().__init__(
            backbone,
            LDAHead(dim, shrinkage=shrinkage, ridge=ridge),
            ClassStatistics(dim, covariance="shared"),
            adapt,
            adapt_blocks,
            adapt_head=LinearHead(dim) if adapt != "none" else None,
            dropout=dropout,
        )
        self.covariance = covariance

    def fit_head(self) -> None:
        cov = self.stats.total_covariance() if self.covariance == "total" else self.stats.shared_covariance()
        self.head.fit(self.stats.means(), cov)
