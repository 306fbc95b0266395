"""SimpleCIL: a prototype classifier on frozen pre-trained features, no training.

Zhou, Cai, Ye, Zhan & Liu, "Revisiting Class-Incremental Learning with Pre-Trained Models:
Generalizability and Adaptivity are All You Need", IJCV 2024 (https://arxiv.org/abs/2303.07338).
For every class ``i`` the prototype is its mean embedding ``p_i = 1/K sum_j phi(x_j)`` (eq. 3)
and the classifier is the cosine similarity ``logit_i = cos(phi(x), p_i)`` (the classifier's
weights are replaced by the prototypes). Nothing is trained, so the engine runs no
optimizer step; each experience costs one pass over its (cached) features.

The recipe it shares with RanPAC and FSA (first-session adaptation, statistics, closed-form head)
is :class:`~clpeft.components.heads.frozen_feature_classifier.FrozenFeatureClassifier`.

Checked against LAMDA-PILOT's ``models/simplecil.py`` (``tests/reference/test_pilot.py``): the
prototypes are the class means of the frozen features of the training images (PILOT takes them
with the test transform, as the engine's un-augmented statistics pass does), the logits the
cosine similarities of PILOT's ``CosineLinear`` (its ``sigma`` is 1: nothing trains).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field

from clpeft.components.heads.class_statistics import ClassStatistics
from clpeft.components.heads.classifiers import PrototypeHead
from clpeft.components.heads.frozen_feature_classifier import FrozenFeatureClassifier
from clpeft.registry import register_strategy


@register_strategy("simplecil")
class SimpleCIL(FrozenFeatureClassifier):
    """SimpleCIL: cosine prototype classifier on frozen pre-trained features, no training (Zhou et al. 2023).

    Args:
        backbone: the feature extractor (frozen by the strategy).
        metric: prototype similarity: ``cosine`` (the paper) or negative squared ``euclidean``.
        scale: logit scale (does not change predictions).
    """

    def __init__(self, backbone, metric: Literal["cosine", "euclidean"] = "cosine", scale: Annotated[float, Field(gt=0)] = 1.0):
        dim = backbone.feature_dim
        super().__init__(backbone, PrototypeHead(dim, metric=metric, scale=scale), ClassStatistics(dim, covariance="none"))

    def fit_head(self) -> None:
        self.head.fit(self.stats)
