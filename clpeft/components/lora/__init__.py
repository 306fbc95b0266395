"""Low-rank and bottleneck modules on frozen layers: dynamic-rank LoRA (layer, injection, adapter files), the LoRA family's adapter kinds (DoRA, PiSSA, VeRA, LoRA-XS, AdaLoRA) and EVA's data-driven start, batched per-sample LoRA, rank budgets (IncreLoRA/AdaLoRA), InfLoRA/GPM input subspaces, O-LoRA's orthogonality terms, MOS's adapter merging, AdaptFormer parallel adapters."""

from clpeft.components.lora.adalora import AdaLoRAAllocator, AdaLoRALinear, orthogonal_penalty
from clpeft.components.lora.adapter_bank import AdapterBank
from clpeft.components.lora.adapter_merging import merge_towards_mean, start_from_last
from clpeft.components.lora.batched import MultiLoRALinear, inject_multi_lora, route
from clpeft.components.lora.dora import DoRALinear
from clpeft.components.lora.eva import eva_init
from clpeft.components.lora.files import load_adapters, save_adapters, save_peft_adapter
from clpeft.components.lora.injection import find_linear_targets, inject_lora, layer_depths, layer_ranks, lora_layers, replace_module
from clpeft.components.lora.input_subspace import InputSubspace
from clpeft.components.lora.kinds import ADAPTER_KINDS, check_adapter
from clpeft.components.lora.layer import LoRAFactors, LoRALinear
from clpeft.components.lora.lora_xs import LoRAXSLinear
from clpeft.components.lora.orthogonal_subspace import current_l2, orthogonality_loss
from clpeft.components.lora.parallel_adapter import Adapter, ParallelAdapterBlock, inject_adapters, shared_weights_copy
from clpeft.components.lora.rank_allocation import RankAllocator
from clpeft.components.lora.sensitivity import SmoothedSensitivity
from clpeft.components.lora.vera import VeRALinear

__all__ = [
    "AdaLoRAAllocator",
    "AdaLoRALinear",
    "Adapter",
    "ADAPTER_KINDS",
    "AdapterBank",
    "check_adapter",
    "current_l2",
    "DoRALinear",
    "eva_init",
    "find_linear_targets",
    "inject_adapters",
    "inject_lora",
    "inject_multi_lora",
    "InputSubspace",
    "layer_depths",
    "layer_ranks",
    "load_adapters",
    "lora_layers",
    "LoRAFactors",
    "LoRALinear",
    "LoRAXSLinear",
    "merge_towards_mean",
    "MultiLoRALinear",
    "orthogonal_penalty",
    "orthogonality_loss",
    "ParallelAdapterBlock",
    "RankAllocator",
    "replace_module",
    "route",
    "save_adapters",
    "save_peft_adapter",
    "shared_weights_copy",
    "SmoothedSensitivity",
    "start_from_last",
    "VeRALinear",
]
