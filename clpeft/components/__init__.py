"""Reusable building blocks, grouped by family; each works alone and never imports the engine or strategies.

* :mod:`~clpeft.components.prompts`: L2P, DualPrompt and CODA-Prompt pools;
* :mod:`~clpeft.components.lora`: dynamic-rank LoRA, batched LoRA, rank budgets, input subspaces, adapters;
* :mod:`~clpeft.components.heads`: classifier heads, class statistics, classifier alignment, the class mask;
* :mod:`~clpeft.components.tta`: the test-time adaptation loop, losses, augmentations, restore;
* :mod:`~clpeft.components.memory`: replay buffers;
* :mod:`~clpeft.components.regularization`: distillation, EMA teachers, the EWC penalty.

Every public name is importable from here (``from clpeft.components import LoRALinear``).
"""

from clpeft.components.heads import (
    AlignedHead,
    ClassifierAlignment,
    ClassMask,
    ClassStatistics,
    CosineHead,
    HeadOptions,
    HeadTraining,
    LDAHead,
    LinearHead,
    PrototypeHead,
    RidgeHead,
    ridge_by_holdout,
)
from clpeft.components.lora import (
    Adapter,
    InputSubspace,
    LoRAFactors,
    LoRALinear,
    MultiLoRALinear,
    ParallelAdapterBlock,
    RankAllocator,
    find_linear_targets,
    inject_adapters,
    inject_lora,
    inject_multi_lora,
    layer_depths,
    layer_ranks,
    load_adapters,
    lora_layers,
    replace_module,
    route,
    save_adapters,
    shared_weights_copy,
)
from clpeft.components.memory import (
    ReplayBuffer,
)
from clpeft.components.prompts import (
    AttentionPromptPool,
    PrefixPrompt,
    PrefixSelection,
    PromptPool,
    PromptSelection,
    promptable_width,
    query_of,
)
from clpeft.components.regularization import (
    DualTeacher,
    EMATeacher,
)
from clpeft.components.tta import (
    AdaptationOptimizer,
    AdaptationOptions,
    EATASampleFilter,
    OnlineAdaptation,
    SourceBatches,
    StochasticRestore,
    TTAugment,
    augmentation_average,
    entropy,
    laplacian_adjustment,
    multi_view_contrastive_loss,
    source_training_data,
    symmetric_cross_entropy,
)

__all__ = [
    "AdaptationOptimizer",
    "AdaptationOptions",
    "Adapter",
    "AlignedHead",
    "AttentionPromptPool",
    "ClassMask",
    "ClassStatistics",
    "ClassifierAlignment",
    "CosineHead",
    "DualTeacher",
    "EATASampleFilter",
    "EMATeacher",
    "HeadOptions",
    "HeadTraining",
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
    "find_linear_targets",
    "inject_adapters",
    "inject_lora",
    "inject_multi_lora",
    "laplacian_adjustment",
    "layer_depths",
    "layer_ranks",
    "load_adapters",
    "lora_layers",
    "multi_view_contrastive_loss",
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
