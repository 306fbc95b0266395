"""HiDe-Prompt's task-specific prefix prompts: one per task, chosen by task-identity inference, with prompt momentum.

Wang, Xie, Zhang, Huang, Su & Zhu, "Hierarchical Decomposition of Prompt-Based Continual
Learning: Rethinking Obscured Sub-optimality", NeurIPS 2023 (https://arxiv.org/abs/2310.07234),
Sec. 4 (within-task prediction). Task ``t`` owns a prompt ``e_t`` of length ``L`` per prompted
layer, used by prefix-tuning (``L`` prefix keys and ``L`` prefix values,
:func:`clpeft.backbones.vit.forward_prompted` with ``prefixes=``). As in the official code
(thu-ml/HiDe-Prompt, ``peft/prompt/hide_prompt.py`` ``EPrompt`` with ``prompt_key: False``, and
``engines/hide_promtp_wtp_and_tap_engine.py``):

* prompts start uniform in ``[-1, 1]``; a new task's prompt starts as a copy of the previous
  one's (``shared_prompt_pool``);
* there are no keys: which prompt a test sample gets is decided outside (by
  :class:`~clpeft.components.heads.task_identity.TaskIdentityInference`);
* **prompt momentum** ``m`` (``prompt_momentum``): while task ``t > 0`` trains, its prompt enters
  the model as ``(1 - m) e_t + m mean_{i<t} e_i`` (the earlier prompts detached), and when the
  task ends ``e_t`` is replaced by that mixture.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class TaskPrefixPrompts(nn.Module):
    """One prefix prompt per task at ``layers``; ``(pool, layer, key/value, L, D)`` parameters.

    Args:
        embed_dim: ``D``, width of the attention's keys and values.
        pool_size: the most tasks the prompts can serve.
        layers: the prompted layers (official ``e_prompt_layer_idx``, ``[0, 1, 2, 3, 4]``).
        length: ``L``, prefix tokens per layer, for keys and for values.
    """

    def __init__(self, embed_dim: int, pool_size: int, layers: Sequence[int], length: int):
        super().__init__()
        self.layers = list(layers)
        self.prompts = nn.Parameter(torch.empty(pool_size, len(self.layers), 2, length, embed_dim).uniform_(-1, 1))

    @property
    def pool_size(self) -> int:
        return self.prompts.shape[0]

    @torch.no_grad()
    def start_task(self, task: int, copy_previous: bool = True) -> None:
        """Before training ``task``: start its prompt from the previous task's."""
        if copy_previous and task > 0:
            self.prompts[task] = self.prompts[task - 1]

    def _mixed(self, task: int, momentum: float) -> torch.Tensor:
        """``(1 - m) e_t + m mean_{i<t} e_i`` (earlier prompts detached); ``e_t`` itself for task 0 or ``m = 0``."""
        if task == 0 or momentum == 0:
            return self.prompts[task]
        return (1 - momentum) * self.prompts[task] + momentum * self.prompts[:task].detach().mean(0)

    def training_prefixes(self, task: int, momentum: float = 0.0) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """``{layer: (keys, values)}``, each ``(L, D)`` shared by the batch: task ``task``'s prompt with momentum."""
        prompt = self._mixed(task, momentum)
        return {layer: (p[0], p[1]) for layer, p in zip(self.layers, prompt)}

    def prefixes(self, tasks: torch.Tensor) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """``{layer: (keys, values)}``, each ``(B, L, D)``: every sample's task prompt (``tasks`` ``(B,)``)."""
        chosen = self.prompts[tasks]  # (B, layer, 2, L, D)
        return {layer: (chosen[:, i, 0], chosen[:, i, 1]) for i, layer in enumerate(self.layers)}

    @torch.no_grad()
    def consolidate(self, task: int, momentum: float) -> None:
        """After training ``task``: replace its prompt by the momentum mixture."""
        self.prompts[task] = self._mixed(task, momentum)
