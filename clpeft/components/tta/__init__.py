"""Test-time adaptation machinery: the online adaptation loop, its optimizer and shared options, TTA losses and sample filters, augmentations, stochastic restore and weight ensembling, model fusion (CMF), contrastive memories and prototypes (AdaContrast, SANTA), LAME's Laplacian adjustment, labelled source data inside a test stream."""

from clpeft.components.tta.augment import TTAugment
from clpeft.components.tta.augment_average import augmentation_average
from clpeft.components.tta.augmix import AugMix
from clpeft.components.tta.category_balanced_memory import CategoryBalancedMemory
from clpeft.components.tta.certainty_diversity import CertaintyDiversityLoss, CertaintyDiversityOptions
from clpeft.components.tta.contrastive_memory import ContrastiveMemory
from clpeft.components.tta.contrastive_views import ContrastiveViews
from clpeft.components.tta.generalized_cross_entropy import generalized_cross_entropy
from clpeft.components.tta.laplacian_adjustment import laplacian_adjustment
from clpeft.components.tta.losses import EATASampleFilter, entropy, multi_view_contrastive_loss, symmetric_cross_entropy
from clpeft.components.tta.lower_norm_layers import lower_norm_layers
from clpeft.components.tta.marginal_entropy import marginal_entropy
from clpeft.components.tta.model_fusion import ModelFusion
from clpeft.components.tta.neighbour_memory import NeighbourMemory
from clpeft.components.tta.object_destruction import destroy_objects
from clpeft.components.tta.online_adaptation import AdaptationOptimizer, OnlineAdaptation
from clpeft.components.tta.options import AdaptationOptions
from clpeft.components.tta.prior_batch_norm import PriorBatchNorm
from clpeft.components.tta.prototype_contrast import PrototypeContrast
from clpeft.components.tta.reliable_entropy import ReliableEntropy, ReliableEntropyOptions, entropy_margin
from clpeft.components.tta.robust_batch_norm import RobustBatchNorm
from clpeft.components.tta.sharpness_aware import SharpnessAwareOptimizer
from clpeft.components.tta.source_data import SourceBatches, source_training_data
from clpeft.components.tta.source_reset import SourceReset
from clpeft.components.tta.stochastic_restore import StochasticRestore
from clpeft.components.tta.weight_ensembling import SourceEnsemble, blend_

__all__ = [
    "AdaptationOptimizer",
    "AdaptationOptions",
    "augmentation_average",
    "AugMix",
    "blend_",
    "CategoryBalancedMemory",
    "CertaintyDiversityLoss",
    "CertaintyDiversityOptions",
    "ContrastiveMemory",
    "ContrastiveViews",
    "destroy_objects",
    "EATASampleFilter",
    "entropy",
    "entropy_margin",
    "generalized_cross_entropy",
    "laplacian_adjustment",
    "lower_norm_layers",
    "marginal_entropy",
    "ModelFusion",
    "multi_view_contrastive_loss",
    "NeighbourMemory",
    "OnlineAdaptation",
    "PriorBatchNorm",
    "PrototypeContrast",
    "ReliableEntropy",
    "ReliableEntropyOptions",
    "RobustBatchNorm",
    "SharpnessAwareOptimizer",
    "source_training_data",
    "SourceBatches",
    "SourceEnsemble",
    "SourceReset",
    "StochasticRestore",
    "symmetric_cross_entropy",
    "TTAugment",
]
