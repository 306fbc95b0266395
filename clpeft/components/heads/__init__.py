"""Classifier heads and what trains them: growing linear/cosine heads, closed-form prototype/LDA/ridge heads, per-class feature statistics, SLCA's classifier alignment, the training-time class mask."""

from clpeft.components.heads.classifiers import CosineHead, LDAHead, LinearHead, PrototypeHead, RidgeHead, ridge_by_holdout
from clpeft.components.heads.class_statistics import ClassStatistics
from clpeft.components.heads.alignment import AlignedHead, ClassifierAlignment
from clpeft.components.heads.class_mask import ClassMask

__all__ = [
    "AlignedHead",
    "ClassifierAlignment",
    "ClassMask",
    "ClassStatistics",
    "CosineHead",
    "LDAHead",
    "LinearHead",
    "PrototypeHead",
    "ridge_by_holdout",
    "RidgeHead",
]
