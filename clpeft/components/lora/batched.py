"""Many LoRA adapters on one frozen layer, each sample routed to its own, in one computation.

A method that keeps one adapter per task and routes each sample to one of them (by task id or a
task predictor) must apply a different adapter to each sample of a mixed batch. Looping over the
adapters (select adapter ``k``'s samples, apply it, scatter the result back, as peft's
``adapter_names`` path does) issues small matmuls plus a gather and a scatter per adapter. :class:`MultiLoRALinear` gathers each sample's factors and runs
two batched matmuls for the whole batch instead, as FLoRA does (Wen & Chaudhuri, "Batched
Low-Rank Adaptation of Foundation Models", ICLR 2024, https://arxiv.org/abs/2312.05677). When
samples have few tokens, copying per-sample factors costs more than the matmuls, so it projects
onto every adapter at once and masks out the other adapters' components instead. Timings:
``benchmarks/multilora_results.md``.

A whole model serves a mixed batch the same way: :func:`inject_multi_lora` puts a
:class:`MultiLoRALinear` at every target layer, and inside ``with route(model, adapter_ids):``
each of them applies sample ``b``'s adapter ``adapter_ids[b]`` -- one forward of the model, N
adapters batched in every layer::

    layers = inject_multi_lora(vit, ["qkv", "proj", "fc1", "fc2"], n_adapters=3, rank=8, alpha=16)
    for k, task_model in enumerate(task_models):          # e.g. three LoRA fine-tunes
        for name, layer in layers.items():
            layer.set_adapter(k, lora_layers(task_model)[name])
    with route(vit, adapter_ids):                         # (batch,) adapter of each sample
        logits = vit(images)

Routing follows the leading dimension of each layer's input, so it needs a model that keeps
samples on dimension 0 in their order (timm ViTs do; text backbones that sort sequences into
micro-batches do not).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from clpeft.components.lora.injection import find_linear_targets, replace_module
from clpeft.components.lora.layer import LoRALinear, frozen, init_lora_a
from clpeft.errors import UserError

__all__ = ["MultiLoRALinear", "inject_multi_lora", "route"]

# Up to this many tokens-per-sample x adapters, projecting every sample onto all adapters beats
# gathering per-sample factors (measured on CPU: batch 64, dim 384, rank 8).
_ALL_ADAPTERS_MAX_WORK = 64


class MultiLoRALinear(nn.Module):
    """A frozen ``nn.Linear`` with ``N`` LoRA adapters; ``forward(x, adapter_ids)`` routes per sample.

    For sample ``b`` with adapter ``k = adapter_ids[b]``:
    ``y_b = base_layer(x_b) + scaling[k] * dropout(x_b) A_k^T B_k^T``. All adapters share one
    rank (adapters of lower rank are zero-padded, which changes nothing: zero rows of ``A`` and
    zero columns of ``B`` contribute nothing and receive zero gradient).

    Args:
        base: the layer to adapt; frozen in place and kept as ``base_layer``.
        n_adapters: ``N``.
        rank: ``r`` of every adapter.
        alpha: ``alpha`` of every adapter (scaling ``alpha / r``).
        dropout: dropout on the input of the low-rank path.

    Attributes:
        lora_A: ``(N, r, in)``; adapter ``k``'s ``A`` is ``lora_A[k]`` (initialised as in peft).
        lora_B: ``(N, out, r)``, zero-initialised.
        scaling: ``(N,)`` buffer, each adapter's ``alpha / r``.
    """

    def __init__(self, base: nn.Linear, n_adapters: int, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        if n_adapters < 1 or rank < 1:
            raise UserError(f"MultiLoRALinear needs n_adapters >= 1 and rank >= 1, got {n_adapters} and {rank}")
        self.base_layer = frozen(base)
        device = base.weight.device
        a = torch.empty(n_adapters, rank, base.in_features, device=device)
        for a_k in a:
            init_lora_a(a_k)
        self.lora_A = nn.Parameter(a)
        self.lora_B = nn.Parameter(torch.zeros(n_adapters, base.out_features, rank, device=device))
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.register_buffer("scaling", torch.full((n_adapters,), alpha / rank, device=device))
        self.routing: torch.Tensor | None = None

    @classmethod
    def from_adapters(cls, adapters: Sequence[LoRALinear], dropout: float = 0.0) -> MultiLoRALinear:
        """Stack trained :class:`LoRALinear` adapters of one base layer (ranks may differ).

        Adapter ``k`` of the result is ``adapters[k]`` (its whole update, frozen parts
        included); the base layer is the first adapter's. The adapters must be unmerged (their
        base weight is shared and must be the original).
        """
        if not adapters or any(adapter.merged for adapter in adapters):
            raise UserError("from_adapters needs at least one adapter, none of them merged")
        rank = max(adapter.rank + adapter.frozen_rank for adapter in adapters)
        multi = cls(adapters[0].base_layer, len(adapters), rank, alpha=rank, dropout=dropout)
        for k, adapter in enumerate(adapters):
            multi.set_adapter(k, adapter)
        return multi

    @torch.no_grad()
    def set_adapter(self, k: int, adapter: LoRALinear) -> None:
        """Make adapter ``k`` equal to ``adapter``'s whole update (zero-padded to this layer's rank).

        ``adapter`` must adapt a layer of the same shape and be unmerged; its base layer is not
        used (this layer keeps its own).
        """
        if adapter.merged:
            raise UserError("set_adapter needs an unmerged LoRALinear (unmerge() it first)")
        a, b, _ = adapter.combined_factors()
        _, rank, in_features = self.lora_A.shape
        if a.shape[0] > rank or a.shape[1] != in_features or b.shape[0] != self.lora_B.shape[1]:
            raise UserError(
                f"an adapter of rank {a.shape[0]} for a {a.shape[1]} -> {b.shape[0]} layer does not fit adapter slot "
                f"{k} of rank {rank} for a {in_features} -> {self.lora_B.shape[1]} layer"
            )
        self.lora_A[k].zero_()
        self.lora_B[k].zero_()
        self.lora_A[k, : a.shape[0]] = a
        self.lora_B[k, :, : a.shape[0]] = b
        self.scaling[k] = adapter.scaling  # the combined update keeps the adapter's scaling

    @property
    def n_adapters(self) -> int:
        return self.lora_A.shape[0]

    def forward(self, x: torch.Tensor, adapter_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Apply each sample's adapter.

        Args:
            x: ``(batch, ..., in)``, e.g. ``(batch, tokens, in)``.
            adapter_ids: ``(batch,)`` integer adapter index of each sample; when ``None``, the
                ids set by :func:`route` around the model's forward.
        """
        if adapter_ids is None:
            adapter_ids = self.routing
            if adapter_ids is None:
                raise UserError("MultiLoRALinear needs adapter_ids: pass them, or run the model inside route(model, adapter_ids)")
        if adapter_ids.shape != (x.shape[0],):
            raise UserError(f"adapter_ids of shape {tuple(adapter_ids.shape)} for a batch of {x.shape[0]} samples")
        result = self.base_layer(x)
        batch = x.shape[0]
        lora_x = self.lora_dropout(x).to(self.lora_A.dtype).reshape(batch, -1, x.shape[-1])
        tokens = lora_x.shape[1]
        if tokens * self.n_adapters <= _ALL_ADAPTERS_MAX_WORK:
            h, b = self._all_adapters(lora_x, adapter_ids)
            out, accumulate = result.reshape(batch * tokens, -1), "addmm"
        else:
            h, b = self._gathered(lora_x, adapter_ids)
            out, accumulate = result.reshape(batch, tokens, -1), "baddbmm"
        # Without autograd, accumulate into the base output in place, saving a pass over it;
        # under autograd the in-place form makes backward copy the gradient, so stay out of place.
        in_place = not torch.is_grad_enabled()
        out = getattr(out, accumulate + "_" if in_place else accumulate)(h.to(out.dtype), b.to(out.dtype))
        return out.view(result.shape)

    def _gathered(self, lora_x: torch.Tensor, adapter_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Each sample's own factors: ``h`` ``(batch, tokens, r)`` and scaled ``B^T`` ``(batch, r, out)``."""
        a = self.lora_A[adapter_ids]
        b = self.lora_B[adapter_ids] * self.scaling[adapter_ids].view(-1, 1, 1)
        return torch.bmm(lora_x, a.transpose(1, 2)), b.transpose(1, 2)

    def _all_adapters(self, lora_x: torch.Tensor, adapter_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Every adapter's ``A`` at once, other adapters' components masked to zero.

        ``h`` is ``(batch * tokens, N r)`` and the stacked ``B^T`` ``(N r, out)``: ``N`` times the
        flops of :meth:`_gathered` but two plain matmuls and no per-sample copies of the factors,
        which is faster when samples have few tokens.
        """
        n, rank, in_features = self.lora_A.shape
        batch, tokens = lora_x.shape[:2]
        h = F.linear(lora_x, self.lora_A.reshape(n * rank, in_features)).view(batch, tokens, n, rank)
        mask = F.one_hot(adapter_ids, n).to(h.dtype) * self.scaling[adapter_ids, None]
        h = (h * mask.view(batch, 1, n, 1)).reshape(batch * tokens, n * rank)
        return h, self.lora_B.transpose(1, 2).reshape(n * rank, -1)

    def extra_repr(self) -> str:
        return f"n_adapters={self.n_adapters}, rank={self.lora_A.shape[1]}"


def inject_multi_lora(
    model: nn.Module,
    targets: Sequence[str],
    n_adapters: int,
    rank: int,
    alpha: float,
    *,
    dropout: float = 0.0,
    key: str | None = None,
) -> dict[str, MultiLoRALinear]:
    """Wrap the target ``nn.Linear`` layers (matched as by :func:`~clpeft.components.lora.inject_lora`) in :class:`MultiLoRALinear`.

    Afterwards only the adapters' factors (``lora_*``) are trainable. Fill adapters with
    :meth:`MultiLoRALinear.set_adapter`, run mixed batches inside :func:`route`.

    Returns:
        The new layers by module path, in module order.
    """
    layers = {}
    for name in find_linear_targets(model, targets, key=key):
        layers[name] = MultiLoRALinear(model.get_submodule(name), n_adapters, rank, alpha, dropout)
        replace_module(model, name, layers[name])
    for name, param in model.named_parameters():
        param.requires_grad_(name.rpartition(".")[2].startswith("lora_"))
    return layers


@contextmanager
def route(model: nn.Module, adapter_ids: torch.Tensor) -> Iterator[None]:
    """Inside the block every :class:`MultiLoRALinear` of ``model`` applies adapter ``adapter_ids[b]`` to sample ``b``.

    Args:
        model: a model holding :class:`MultiLoRALinear` layers (see :func:`inject_multi_lora`).
        adapter_ids: ``(batch,)`` integer adapter index of each sample of the batch the block
            runs through ``model``.
    """
    layers = [m for m in model.modules() if isinstance(m, MultiLoRALinear)]
    if not layers:
        raise UserError(f"{type(model).__name__} has no MultiLoRALinear layers to route; use inject_multi_lora first")
    ids = torch.as_tensor(adapter_ids, dtype=torch.long)
    n = layers[0].n_adapters
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= n):
        raise UserError(f"adapter ids must lie in 0..{n - 1}, got {ids.min().item()}..{ids.max().item()}")
    previous = [layer.routing for layer in layers]
    for layer in layers:
        layer.routing = ids.to(layer.lora_A.device)
    try:
        yield
    finally:
        for layer, ids_before in zip(layers, previous, strict=True):
            layer.routing = ids_before
