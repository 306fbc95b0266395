"""Reusable building blocks; each works alone and never imports the engine or strategies."""

from clpeft.components.heads import LinearHead
from clpeft.components.lora import (
    LoRALinear,
    inject_lora,
    layer_depths,
    layer_ranks,
    load_adapters,
    lora_layers,
    save_adapters,
)
from clpeft.components.multi_lora import MultiLoRALinear
from clpeft.components.rank_allocation import RankAllocator
from clpeft.components.replay import ReplayBuffer

__all__ = [
    "LinearHead",
    "LoRALinear",
    "MultiLoRALinear",
    "RankAllocator",
    "ReplayBuffer",
    "inject_lora",
    "layer_depths",
    "layer_ranks",
    "load_adapters",
    "lora_layers",
    "save_adapters",
]
