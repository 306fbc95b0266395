"""HiDe-LoRA's task-specific LoRA: one adapter per task on the same frozen layers, each sample routed to its task's.

Wang, Xie, Zhang, Su & Zhu, "HiDe-PET: Continual Learning via Hierarchical Decomposition of
Parameter-Efficient Tuning", TPAMI 2025 (https://arxiv.org/abs/2407.05229), Sec. 4 (task-specific
PET). As in the official code (thu-ml/HiDe-Prompt, ``peft/lora/hide_lora.py`` ``HideLoraPool`` and
``engines/hide_lora_wtp_and_tap_engine.py``):

* task ``t`` owns ``A_t`` and ``B_t`` at every adapted layer, with ``delta W_t = (alpha / r) B_t A_t``;
  the official pool adapts the key and value projections of the first ``lora_depth`` blocks;
* ``B`` starts at zero and ``A`` uniform in ``[-1/sqrt(r), 1/sqrt(r)]``: the official ``A`` is
  stored ``(D, r)`` and ``kaiming_uniform_(a=sqrt(5))`` takes ``r`` as its fan-in (peft's, on
  ``(r, D)``, would give ``1/sqrt(D)``);
* a new task's adapter starts as a copy of the previous one's (:meth:`TaskLoRA.start_task`);
* after the task, its adapter becomes ``(1 - m) (A_t, B_t) + m mean_{i<t} (A_i, B_i)`` (LoRA
  momentum ``m``, each factor averaged on its own; :meth:`TaskLoRA.consolidate`);
* a test sample gets the adapter of the task its task-identity inference predicts.

All adapters of a layer live in one :class:`~clpeft.components.lora.batched.MultiLoRALinear`, so a
batch whose samples go to different tasks costs one forward of the model (inside
:func:`~clpeft.components.lora.batched.route`). Outside ``route`` the layer is the frozen one
(:class:`TaskLoRALinear`): the same model gives the frozen features that task-identity inference and
the feature cache read.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractContextManager

import torch
from torch import nn

from clpeft.components.lora.batched import MultiLoRALinear, route
from clpeft.components.lora.injection import find_linear_targets, replace_module

__all__ = ["TaskLoRA", "TaskLoRALinear"]


class TaskLoRALinear(MultiLoRALinear):
    """A :class:`MultiLoRALinear` that is its frozen base layer when no adapter ids are given or routed."""

    def forward(self, x: torch.Tensor, adapter_ids: torch.Tensor | None = None) -> torch.Tensor:
        if adapter_ids is None and self.routing is None:
            return self.base_layer(x)
        return super().forward(x, adapter_ids)


class TaskLoRA:
    """One LoRA adapter per task at ``targets`` of ``model`` (replaced in place by :class:`TaskLoRALinear`).

    Not a module: the layers are the model's own (saved and loaded with it). The factors are
    frozen until :meth:`requires_grad_` makes them trainable.

    Args:
        model: the network to adapt (a timm ViT, with split ``qkv`` for key/value targets).
        targets: module-name suffixes of the adapted linears (``blocks.0.attn.qkv.k``, ...).
        pool_size: the number of adapters, the most tasks.
        rank: ``r``.
        alpha: ``alpha``; the scaling is ``alpha / r`` (the official ``lora_alpha`` 1).
        key: the config key named when a target matches no layer.
    """

    def __init__(self, model: nn.Module, targets: Sequence[str], pool_size: int, rank: int, alpha: float, key: str | None = None):
        self.model = model
        self.layers: dict[str, TaskLoRALinear] = {}
        for name in find_linear_targets(model, targets, key=key):
            layer = TaskLoRALinear(model.get_submodule(name), pool_size, rank, alpha)
            with torch.no_grad():
                layer.lora_A.uniform_(-(rank**-0.5), rank**-0.5)
            replace_module(model, name, layer)
            self.layers[name] = layer
        self.requires_grad_(False)

    @property
    def pool_size(self) -> int:
        return next(iter(self.layers.values())).n_adapters

    def parameters(self) -> list[nn.Parameter]:
        """Every layer's ``lora_A`` and ``lora_B`` (all tasks' adapters; only the routed ones receive gradients)."""
        return [p for layer in self.layers.values() for p in (layer.lora_A, layer.lora_B)]

    def requires_grad_(self, trainable: bool) -> None:
        """Make the factors trainable (while a task trains) or frozen (between tasks: the model is then frozen)."""
        for p in self.parameters():
            p.requires_grad_(trainable)

    @torch.no_grad()
    def start_task(self, task: int) -> None:
        """Before training ``task``: start its adapter from the previous task's."""
        if task > 0:
            for p in self.parameters():
                p[task] = p[task - 1]

    @torch.no_grad()
    def consolidate(self, task: int, momentum: float) -> None:
        """After training ``task``: its factors become ``(1 - m)`` themselves plus ``m`` the earlier tasks' mean."""
        if task > 0 and momentum > 0:
            for p in self.parameters():
                p[task] = (1 - momentum) * p[task] + momentum * p[:task].mean(0)

    def routed(self, tasks: torch.Tensor) -> AbstractContextManager[None]:
        """Inside the block the model applies sample ``b``'s task adapter ``tasks[b]``."""
        return route(self.model, tasks)
