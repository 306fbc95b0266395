"""Reusable building blocks; each works alone and never imports the engine or strategies."""

from clpeft.components.adapter import Adapter, ParallelAdapterBlock, inject_adapters, shared_weights_copy
from clpeft.components.attention_prompt_pool import AttentionPromptPool
from clpeft.components.augment_average import TTAugment, augmentation_average
from clpeft.components.class_statistics import ClassStatistics
from clpeft.components.classifier_alignment import AlignedHead, ClassifierAlignment
from clpeft.components.ema import DualTeacher, EMATeacher
from clpeft.components.heads import CosineHead, LDAHead, LinearHead, PrototypeHead, RidgeHead, ridge_by_holdout
from clpeft.components.input_subspace import InputSubspace
from clpeft.components.laplacian_adjustment import laplacian_adjustment
from clpeft.components.lora import (
    LoRAFactors,
    LoRALinear,
    find_linear_targets,
    inject_lora,
    layer_depths,
    layer_ranks,
    load_adapters,
    lora_layers,
    replace_module,
    save_adapters,
)
from clpeft.components.multi_lora import MultiLoRALinear, inject_multi_lora, route
from clpeft.components.prefix_prompt import PrefixPrompt, PrefixSelection
from clpeft.components.prompt_pool import PromptPool, PromptSelection
from clpeft.components.prompted_classifier import ClassMask, promptable_width, query_of
from clpeft.components.rank_allocation import RankAllocator
from clpeft.components.replay import ReplayBuffer
from clpeft.components.source_data import SourceBatches, source_training_data
from clpeft.components.stochastic_restore import StochasticRestore
from clpeft.components.test_time import AdaptationOptimizer, OnlineAdaptation
from clpeft.components.tta_losses import (
    EATASampleFilter,
    entropy,
    multi_view_contrastive_loss,
    symmetric_cross_entropy,
)

__all__ = [
    "Adapter",
    "AdaptationOptimizer",
    "AlignedHead",
    "AttentionPromptPool",
    "ClassMask",
    "ClassStatistics",
    "ClassifierAlignment",
    "CosineHead",
    "DualTeacher",
    "EATASampleFilter",
    "EMATeacher",
    "InputSubspace",
    "LDAHead",
    "LinearHead",
    "LoRAFactors",
    "LoRALinear",
    "MultiLoRALinear",
    "OnlineAdaptation",
    "ParallelAdapterBlock",
    "PrefixPrompt",
    "PrefixSelection",
    "PromptPool",
    "PromptSelection",
    "PrototypeHead",
    "RankAllocator",
    "ReplayBuffer",
    "RidgeHead",
    "SourceBatches",
    "StochasticRestore",
    "TTAugment",
    "augmentation_average",
    "entropy",
    "inject_adapters",
    "find_linear_targets",
    "inject_lora",
    "inject_multi_lora",
    "laplacian_adjustment",
    "multi_view_contrastive_loss",
    "layer_depths",
    "layer_ranks",
    "load_adapters",
    "lora_layers",
    "promptable_width",
    "query_of",
    "replace_module",
    "ridge_by_holdout",
    "route",
    "save_adapters",
    "shared_weights_copy",
    "source_training_data",
    "symmetric_cross_entropy",
]
