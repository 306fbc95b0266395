"""A pool of per-task LoRA adapters on a generative LLM: one trains at a time, a mixed batch is served in one pass.

Each task ``t`` owns a LoRA (Hu et al., ICLR 2022, https://arxiv.org/abs/2106.09685) at every target
layer, ``W x + (alpha / r) B_t A_t x``, all of a layer's adapters stacked in one
:class:`~clpeft.components.lora.batched.MultiLoRALinear` (``A_t`` drawn as peft draws it,
``B_t = 0``: a fresh adapter leaves the model's outputs unchanged). A layer
(:class:`TaskAdapterLinear`) computes

* inside :func:`~clpeft.components.lora.batched.route`: sample ``b``'s own adapter (FLoRA's batched
  per-sample LoRA, Wen & Chaudhuri, ICLR 2024, https://arxiv.org/abs/2312.05677): the prefill and
  every decoding step of :meth:`GenerativeLM.generate
  <clpeft.backbones.generative_lm.GenerativeLM.generate>` keep the samples on dimension 0 in
  their order (the KV cache holds each sample's own keys and values), as do training batches;
* outside it, with a task in training (:meth:`TaskAdapters.train_task`): that task's adapter for the
  whole batch, so gradient checkpointing's recomputation in the backward pass sees the same
  model; only that adapter's slices of the stacked factors receive (nonzero) gradients;
* otherwise: the frozen layer (the pretrained model, e.g. for a router's prompt embeddings).

:func:`task_lora` gives task ``t``'s adapter alone as LoRA layers, to save as a peft adapter or fold
into a plain model (:mod:`clpeft.components.generative.export`).
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager

import torch
import torch.nn.functional as F
from torch import nn

from clpeft.components.lora.batched import route
from clpeft.components.lora.files import single_adapters
from clpeft.components.lora.injection import find_linear_targets, replace_module
from clpeft.components.lora.layer import LoRALinear
from clpeft.components.lora.task_lora import TaskLoRALinear

__all__ = ["TaskAdapterLinear", "TaskAdapters", "task_lora"]


class TaskAdapterLinear(TaskLoRALinear):
    """A :class:`TaskLoRALinear` that applies adapter :attr:`active` to every sample when no ids are routed."""

    active: int | None = None

    def forward(self, x: torch.Tensor, adapter_ids: torch.Tensor | None = None) -> torch.Tensor:
        if adapter_ids is None and self.routing is None and self.active is not None:
            k = self.active
            result = self.base_layer(x)
            low_rank = F.linear(F.linear(self.lora_dropout(x).to(self.lora_A.dtype), self.lora_A[k]), self.lora_B[k])
            return result + (self.scaling[k] * low_rank).to(result.dtype)
        return super().forward(x, adapter_ids)


class TaskAdapters:
    """``n_adapters`` LoRA adapters at the ``targets`` of ``net`` (replaced in place by :class:`TaskAdapterLinear`).

    Not a module: the layers are the model's own, saved and loaded with it.

    Args:
        net: the transformers model.
        targets: module-name suffixes of the adapted linears (``q_proj``, ``v_proj``).
        n_adapters: the pool's size.
        rank: ``r`` of every adapter.
        alpha: ``alpha`` (scaling ``alpha / r``).
        dropout: dropout on the adapters' input.
        key: the config key named when a target matches no layer.
    """

    def __init__(
        self, net: nn.Module, targets: Sequence[str], n_adapters: int, rank: int, alpha: float, dropout: float = 0.0, key: str | None = None
    ):
        self.net = net
        self.layers: dict[str, TaskAdapterLinear] = {}
        for name in find_linear_targets(net, targets, key=key):
            self.layers[name] = TaskAdapterLinear(net.get_submodule(name), n_adapters, rank, alpha, dropout)
            replace_module(net, name, self.layers[name])

    def parameters(self) -> list[nn.Parameter]:
        """Every layer's stacked ``lora_A`` and ``lora_B``."""
        return [p for layer in self.layers.values() for p in (layer.lora_A, layer.lora_B)]

    def train_task(self, task: int | None) -> None:
        """Apply adapter ``task`` to every sample outside routing (``None``: the frozen layers)."""
        for layer in self.layers.values():
            layer.active = task

    def routed(self, adapter_ids: torch.Tensor) -> AbstractContextManager[None]:
        """Inside the block sample ``b`` gets adapter ``adapter_ids[b]`` (one forward for the batch)."""
        return route(self.net, adapter_ids)


def task_lora(net: nn.Module, task: int) -> dict[str, LoRALinear]:
    """Adapter ``task`` of every :class:`TaskAdapterLinear` of ``net``, by module path, as LoRA layers
    (:func:`~clpeft.components.lora.files.single_adapters`); ``{}`` when ``net`` has none."""
    layers = {name: m for name, m in net.named_modules() if isinstance(m, TaskAdapterLinear)}
    return single_adapters(layers, task) if layers else {}
