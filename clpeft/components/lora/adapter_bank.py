"""One AdaptFormer adapter per task in every block of a ViT, all of them applied in one forward pass.

Methods that train a new adapter set per task and read every task's features at test time
(EASE: Zhou et al., "Expandable Subspace Ensemble for Pre-Trained Model-Based Class-Incremental
Learning", CVPR 2024, https://arxiv.org/abs/2403.12030) need ``n`` feature vectors per image, one
per adapter set. LAMDA-PILOT's ``backbone/vit_ease.py`` runs the blocks ``n`` times in a Python
loop. Here the embedded tokens are repeated ``n`` times along the batch (adapter-major) and go
through the blocks once: every frozen linear layer sees one ``n``-times larger batch, and each
block's :class:`AdapterBank` applies adapter ``k`` to slice ``k`` with two batched matmuls
(``torch.baddbmm`` over the stacked adapter weights, no per-sample gathering: the slices are
contiguous). The patch embedding runs once; the flops of the blocks are the same as the loop's,
the kernel launches ``1/n`` of them (the batched multi-adapter idea of
:mod:`clpeft.components.lora.batched`, for adapters in parallel to the MLP).

Training sees only the trainable ``current`` adapter of each bank (a plain
:class:`~clpeft.components.lora.parallel_adapter.Adapter`); :meth:`AdapterBank.freeze_current`
appends it to the frozen stack (buffers, so they are saved and resumed with the model).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from clpeft.components.lora.injection import replace_module
from clpeft.components.lora.parallel_adapter import Adapter, ParallelAdapterBlock

_STACKS = ("down_weight", "down_bias", "up_weight", "up_bias")


class AdapterBank(nn.Module):
    """A block's adapters: the trainable ``current`` one and the frozen ones before it, stacked.

    ``forward(x)`` applies ``current`` to the whole batch while :attr:`groups` is 0 (training);
    with ``groups = n`` the batch holds ``n`` equal slices and frozen adapter ``k`` is applied to
    slice ``k`` (see :func:`every_adapter`). Frozen adapters run without dropout.

    Args:
        dim: token width ``D``.
        bottleneck: ``d``, each adapter's hidden width.
        scale: ``s``, the factor on every adapter's output.
        dropout: dropout of the current adapter's bottleneck while training.

    Buffers: ``down_weight`` (n, d, D), ``down_bias`` (n, d), ``up_weight`` (n, D, d),
    ``up_bias`` (n, D); loading a state resizes them to the stored ``n``.
    """

    def __init__(self, dim: int, bottleneck: int, scale: float = 0.1, dropout: float = 0.1):
        super().__init__()
        self.dim, self.bottleneck, self.scale, self.dropout = dim, bottleneck, scale, dropout
        for name, shape in zip(_STACKS, ((bottleneck, dim), (bottleneck,), (dim, bottleneck), (dim,)), strict=True):
            self.register_buffer(name, torch.zeros(0, *shape))
        self.current: Adapter | None = None
        self.groups = 0

    @property
    def n_frozen(self) -> int:
        return self.down_weight.shape[0]

    def new_adapter(self) -> Adapter:
        """A fresh trainable ``current`` adapter (zero output at the start, as AdaptFormer's)."""
        self.current = Adapter(self.dim, self.bottleneck, self.scale, self.dropout).to(self.down_weight.device)
        return self.current

    @torch.no_grad()
    def freeze_current(self) -> None:
        """Append ``current`` to the frozen stack; afterwards there is no current adapter."""
        a = self.current
        parts = (a.down_proj.weight, a.down_proj.bias, a.up_proj.weight, a.up_proj.bias)
        for name, part in zip(_STACKS, parts, strict=True):
            setattr(self, name, torch.cat([getattr(self, name), part.detach()[None].to(getattr(self, name))]))
        self.current = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.groups == 0:
            return self.current(x)
        n = self.groups
        slices = x.reshape(n, -1, x.shape[-1])  # slice k: every token of the batch's k-th copy
        dtype = slices.dtype
        h = F.relu(torch.baddbmm(self.down_bias[:n, None].to(dtype), slices, self.down_weight[:n].transpose(1, 2).to(dtype)))
        out = torch.baddbmm(self.up_bias[:n, None].to(dtype), h, self.up_weight[:n].transpose(1, 2).to(dtype))
        return (out * self.scale).reshape(x.shape)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for name in _STACKS:
            stored = state_dict.get(prefix + name)
            if stored is not None:
                setattr(self, name, torch.zeros_like(stored, device=getattr(self, name).device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, bottleneck={self.bottleneck}, scale={self.scale}, frozen={self.n_frozen}"


def inject_adapter_banks(vit: nn.Module, bottleneck: int, scale: float = 0.1, dropout: float = 0.1) -> list[AdapterBank]:
    """Wrap every block of a timm ViT (``vit.blocks``) in a
    :class:`~clpeft.components.lora.parallel_adapter.ParallelAdapterBlock` around an empty
    :class:`AdapterBank`, in place; the ViT's own parameters are frozen. Returns the banks in block order."""
    for p in vit.parameters():
        p.requires_grad_(False)
    banks = []
    for i, block in enumerate(list(vit.blocks)):
        banks.append(AdapterBank(vit.embed_dim, bottleneck, scale, dropout).to(block.mlp.fc1.weight.device))
        replace_module(vit, f"blocks.{i}", ParallelAdapterBlock(block, banks[-1]))
    return banks


@contextmanager
def every_adapter(vit: nn.Module, banks: list[AdapterBank], n: int) -> Iterator[None]:
    """Inside the block, a forward of ``vit`` on a batch of ``B`` runs its blocks once on ``n B``
    tokens sequences: the embedded batch repeated ``n`` times, copy ``k`` through frozen adapters ``k``.

    The model's output then has ``n B`` rows, adapter-major (rows ``k B .. (k + 1) B - 1`` are
    adapter ``k``'s); :func:`split_by_adapter` turns them into ``(B, n, D)``.
    """
    if not 1 <= n <= min(bank.n_frozen for bank in banks):
        raise ValueError(f"every_adapter needs 1 <= n <= the {min(bank.n_frozen for bank in banks)} frozen adapters, got {n}")
    handle = vit.blocks.register_forward_pre_hook(lambda module, args: (args[0].repeat(n, *[1] * (args[0].dim() - 1)),))
    for bank in banks:
        bank.groups = n
    try:
        yield
    finally:
        handle.remove()
        for bank in banks:
            bank.groups = 0


def split_by_adapter(output: torch.Tensor, n: int) -> torch.Tensor:
    """``(n B, D)`` adapter-major rows -> ``(B, n, D)``."""
    return output.reshape(n, -1, output.shape[-1]).transpose(0, 1)
