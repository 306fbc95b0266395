"""AdaptFormer-style parallel adapters for timm ViT blocks, injected by wrapping.

Chen et al., "AdaptFormer: Adapting Vision Transformers for Scalable Visual Recognition",
NeurIPS 2022 (https://arxiv.org/abs/2205.13535), eq. 2-3: a bottleneck module runs in parallel
to each block's MLP, on the MLP branch's input ``x'`` (after the attention residual)::

    x_ada = s * W_up ReLU(W_down x')            (down: D -> d, up: d -> D)
    x_out = x' + MLP(LN(x')) + x_ada

As in AdaptFormer's code and APER (Zhou et al., 2023, LAMDA-PILOT ``vit_adapter.py``): no
layer norm inside the adapter, ``W_down`` kaiming-uniform, ``W_up`` and both biases zero (so
an injected model computes exactly what it computed before), ``s = 0.1``, ``d = 64``, and
dropout 0.1 on the bottleneck.

:func:`inject_adapters` wraps a model's blocks (:class:`ParallelAdapterBlock` calls the block's
own submodules, nothing of timm is copied). :func:`shared_weights_copy` gives a copy of a model
that shares its weights, so adapters (or LoRA) can be injected into the copy while the original
keeps computing the pre-trained features -- APER's two branches without twice the weights.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence

import torch
from timm.models.vision_transformer import Block
from torch import nn

from clpeft.components.lora.injection import replace_module


class Adapter(nn.Module):
    """The bottleneck ``s * W_up ReLU(W_down x)`` (output zero at initialisation).

    Args:
        dim: token width ``D``.
        bottleneck: ``d``, the hidden width.
        scale: ``s``, a fixed factor on the output.
        dropout: dropout on the bottleneck activations.
    """

    def __init__(self, dim: int, bottleneck: int = 64, scale: float = 0.1, dropout: float = 0.1):
        super().__init__()
        self.down_proj = nn.Linear(dim, bottleneck)
        self.up_proj = nn.Linear(bottleneck, dim)
        self.dropout = nn.Dropout(dropout)
        self.scale = scale
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.down_proj.weight, a=math.sqrt(5))
            for t in (self.down_proj.bias, self.up_proj.weight, self.up_proj.bias):
                nn.init.zeros_(t)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up_proj(self.dropout(torch.relu(self.down_proj(x)))) * self.scale

    def extra_repr(self) -> str:
        return f"scale={self.scale}"


def is_standard_block(block: nn.Module) -> bool:
    """Whether ``block`` is a timm ``Block`` with timm's own forward (what the wrapper recomposes)."""
    return isinstance(block, Block) and type(block).forward is Block.forward


class ParallelAdapterBlock(nn.Module):
    """A timm ``Block`` with an :class:`Adapter` parallel to its MLP (AdaptFormer eq. 3).

    ``x' = x + drop_path1(ls1(attn(norm1(x))))``, then
    ``x' + drop_path2(ls2(mlp(norm2(x')))) + adapter(x')``: the block's own submodules, in the
    order of ``Block.forward``.

    Args:
        block: a standard timm ``Block`` (see :func:`is_standard_block`), kept as ``block``.
        adapter: the parallel module.
    """

    def __init__(self, block: Block, adapter: Adapter):
        super().__init__()
        if not is_standard_block(block):
            raise TypeError(f"parallel adapters wrap standard timm Blocks, got {type(block).__name__}")
        self.block = block
        self.adapter = adapter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.block
        x = x + b.drop_path1(b.ls1(b.attn(b.norm1(x))))
        return x + b.drop_path2(b.ls2(b.mlp(b.norm2(x)))) + self.adapter(x)


def inject_adapters(
    vit: nn.Module,
    bottleneck: int = 64,
    scale: float = 0.1,
    dropout: float = 0.1,
    layers: Sequence[int] | None = None,
) -> dict[str, Adapter]:
    """Wrap blocks of a timm ViT (``vit.blocks``) in :class:`ParallelAdapterBlock`, in place.

    Afterwards only the adapters' parameters are trainable.

    Args:
        vit: a model with ``blocks`` of standard timm ``Block`` s (and ``embed_dim``).
        bottleneck, scale, dropout: see :class:`Adapter`.
        layers: indices of the adapted blocks (default: all).

    Returns:
        The new adapters by module path of their block (``blocks.3``), in block order.
    """
    blocks = getattr(vit, "blocks", None)
    if blocks is None:
        raise TypeError(f"{type(vit).__name__} has no 'blocks': adapters are injected into timm ViTs")
    chosen = range(len(blocks)) if layers is None else sorted(set(layers))
    bad = [i for i in chosen if not 0 <= i < len(blocks)]
    if bad:
        raise ValueError(f"adapter layers {bad} are outside 0..{len(blocks) - 1}")
    for p in vit.parameters():
        p.requires_grad_(False)
    adapters = {}
    for i in chosen:
        block = blocks[i]
        weight = block.mlp.fc1.weight
        adapter = Adapter(vit.embed_dim, bottleneck, scale, dropout).to(weight.device, weight.dtype)
        replace_module(vit, f"blocks.{i}", ParallelAdapterBlock(block, adapter))
        adapters[f"blocks.{i}"] = adapter
    return adapters


def shared_weights_copy(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` whose parameters *are* the original's (same tensors).

    Modules can then be replaced or wrapped inside the copy (adapters, LoRA) without touching
    the original, and no weight is stored twice (``parameters()`` of a parent holding both
    lists each shared tensor once). Buffers are copied.
    """
    memo = {id(p): p for p in module.parameters()}
    return copy.deepcopy(module, memo)
