"""Test-time adaptation machinery: the online adaptation loop, its optimizer and shared options, TTA losses and sample filters, CoTTA's augmentations and stochastic restore, LAME's Laplacian adjustment, labelled source data inside a test stream."""

from clpeft.components.tta.augment import TTAugment
from clpeft.components.tta.augment_average import augmentation_average
from clpeft.components.tta.augmix import AugMix
from clpeft.components.tta.category_balanced_memory import CategoryBalancedMemory
from clpeft.components.tta.laplacian_adjustment import laplacian_adjustment
from clpeft.components.tta.losses import EATASampleFilter, entropy, multi_view_contrastive_loss, symmetric_cross_entropy
from clpeft.components.tta.online_adaptation import AdaptationOptimizer, OnlineAdaptation
from clpeft.components.tta.options import AdaptationOptions
from clpeft.components.tta.prior_batch_norm import PriorBatchNorm
from clpeft.components.tta.robust_batch_norm import RobustBatchNorm
from clpeft.components.tta.sharpness_aware import SharpnessAwareOptimizer
from clpeft.components.tta.source_data import SourceBatches, source_training_data
from clpeft.components.tta.source_reset import SourceReset
from clpeft.components.tta.stochastic_restore import StochasticRestore

__all__ = [
    "AdaptationOptimizer",
    "AdaptationOptions",
    "augmentation_average",
    "AugMix",
    "CategoryBalancedMemory",
    "EATASampleFilter",
    "entropy",
    "laplacian_adjustment",
    "multi_view_contrastive_loss",
    "OnlineAdaptation",
    "PriorBatchNorm",
    "RobustBatchNorm",
    "SharpnessAwareOptimizer",
    "source_training_data",
    "SourceBatches",
    "SourceReset",
    "StochasticRestore",
    "symmetric_cross_entropy",
    "TTAugment",
]
