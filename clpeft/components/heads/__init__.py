"""Classifier heads and what trains them: growing linear/cosine heads, closed-form prototype/LDA/ridge heads, per-class feature statistics, SLCA's classifier alignment, the training-time class mask, and the head options strategies share (:class:`HeadOptions`, applied by :class:`HeadTraining`).

The closed-form-head strategy base, :class:`~clpeft.components.heads.frozen_feature_classifier.FrozenFeatureClassifier`,
is imported from its module: it subclasses :class:`clpeft.Strategy`, whose module imports this package.
"""

from clpeft.components.heads.alignment import AlignedHead, ClassifierAlignment
from clpeft.components.heads.bias_correction import BiasCorrection
from clpeft.components.heads.centroid_statistics import CentroidStatistics, contrastive_regularisation
from clpeft.components.heads.class_mask import ClassMask
from clpeft.components.heads.class_statistics import ClassStatistics
from clpeft.components.heads.classifiers import CosineHead, LDAHead, LinearHead, PrototypeHead, RidgeHead, ridge_by_holdout
from clpeft.components.heads.head_retraining import retrain_head
from clpeft.components.heads.head_training import HeadOptions, HeadTraining
from clpeft.components.heads.hierarchical_decomposition import (
    HierarchicalOptions,
    learn_task_adaptive_prediction,
    learn_task_identity,
    within_task_loss,
)
from clpeft.components.heads.imprinting import HeldRows, imprint_rows
from clpeft.components.heads.mahalanobis import MahalanobisHead
from clpeft.components.heads.nearest_mean_of_exemplars import NearestMeanOfExemplars
from clpeft.components.heads.optimal_transport import sinkhorn, transport_old_heads
from clpeft.components.heads.task_identity import TaskIdentityInference
from clpeft.components.heads.weight_aligning import align_weights, clip_weights

__all__ = [
    "align_weights",
    "AlignedHead",
    "BiasCorrection",
    "CentroidStatistics",
    "ClassifierAlignment",
    "ClassMask",
    "ClassStatistics",
    "clip_weights",
    "contrastive_regularisation",
    "CosineHead",
    "HeadOptions",
    "HeadTraining",
    "HeldRows",
    "HierarchicalOptions",
    "imprint_rows",
    "LDAHead",
    "learn_task_adaptive_prediction",
    "learn_task_identity",
    "LinearHead",
    "MahalanobisHead",
    "NearestMeanOfExemplars",
    "PrototypeHead",
    "retrain_head",
    "ridge_by_holdout",
    "RidgeHead",
    "sinkhorn",
    "TaskIdentityInference",
    "transport_old_heads",
    "within_task_loss",
]
