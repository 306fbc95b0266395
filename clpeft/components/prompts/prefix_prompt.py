"""DualPrompt's G- and E-prompts as prefix keys/values of a frozen ViT.

Wang et al., "DualPrompt: Complementary Prompting for Rehearsal-free Continual Learning",
ECCV 2022 (https://arxiv.org/abs/2204.04799), Sec. 4. Two kinds of prompts are attached by
prefix-tuning (Sec. 4.2): a prompt ``p = (p_K, p_V)`` of length ``L`` at layer ``i`` makes that
layer attend with ``K = [p_K; h W_K]`` and ``V = [p_V; h W_V]``
(:func:`clpeft.backbones.vit.forward_prompted` with ``prefixes=``).

* **G-prompt** ``g`` (length ``L_g``) at the layers ``g_layers`` (``start_g..end_g``, default
  ``[0, 1]``), shared by every task.
* **E-prompts** ``e_t`` (length ``L_e``) at the layers ``e_layers`` (default ``[2, 3, 4]``),
  one per task ``t``, each with a key ``k_t``. While training task ``t`` the E-prompt of ``t`` is
  used and its key is pulled towards the query with the matching loss (eq. 4's second term)::

      L_match = gamma(q(x), k_t),   gamma(q, k) = 1 - cos(q, k)

  At inference the task is unknown: the E-prompt whose key is nearest to the query is used,
  ``t_x = argmin_t gamma(q(x), k_t)`` (eq. 3).

As in the official code (google-research/l2p, JH-LEE-KR/dualprompt-pytorch) prompts and keys are
initialised uniformly in ``[-1, 1]``, keys and values are separate parameters, and a new task's
E-prompt may start as a copy of the previous task's (``shared_prompt_pool``, see
:meth:`PrefixPrompt.start_task`). Unlike the official code, inference chooses among the keys of
the tasks trained so far only (untrained keys are random and carry nothing; at ViT-B's width a
random key is nearly orthogonal to every query, so the official code practically never picks one
either), and every sample gets its own E-prompt's keys and values (the official PyTorch port's
E-prompt reshape mixes them across the batch; see :mod:`clpeft.strategies.dualprompt`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from clpeft.components.prompts.prompt_pool import batchwise_majority, cosine_distance


@dataclass
class PrefixSelection:
    """What :class:`PrefixPrompt` returns for a batch.

    Attributes:
        prefixes: ``{layer: (keys, values)}``, each ``(B, L, D)`` (``(L, D)`` for the G-prompt),
            ready for ``forward_prompted(..., prefixes=...)``.
        tasks: ``(B,)`` index of the E-prompt used for each sample.
        matching_loss: ``gamma(q(x), k_t)`` averaged over the batch.
    """

    prefixes: dict[int, tuple[torch.Tensor, torch.Tensor]]
    tasks: torch.Tensor
    matching_loss: torch.Tensor


class PrefixPrompt(nn.Module):
    """A shared G-prompt and a pool of task-keyed E-prompts, injected as attention prefixes.

    Args:
        embed_dim: ``D``, the width of the attention's keys and values.
        pool_size: number of E-prompts (the most tasks the pool can learn).
        g_layers: layers that get the G-prompt.
        e_layers: layers that get the E-prompt (disjoint from ``g_layers``).
        g_length: ``L_g``, G-prompt length (prefix tokens per layer, for keys and for values).
        e_length: ``L_e``, E-prompt length.
        key_dim: width of keys and queries (``D`` by default).
        batchwise: at inference, use the E-prompt chosen most often in the batch for every sample
            (official code's ``batchwise_prompt``).
    """

    def __init__(
        self,
        embed_dim: int,
        pool_size: int,
        g_layers: Sequence[int] = (0, 1),
        e_layers: Sequence[int] = (2, 3, 4),
        g_length: int = 5,
        e_length: int = 5,
        key_dim: int | None = None,
        batchwise: bool = False,
    ):
        super().__init__()
        if set(g_layers) & set(e_layers):
            raise ValueError(f"G-prompt layers {list(g_layers)} and E-prompt layers {list(e_layers)} overlap")
        self.g_layers = list(g_layers)
        self.e_layers = list(e_layers)
        self.batchwise = batchwise
        # (layer, key/value, L, D) and (task, layer, key/value, L, D)
        self.g_prompt = nn.Parameter(torch.empty(len(self.g_layers), 2, g_length, embed_dim).uniform_(-1, 1))
        self.e_prompts = nn.Parameter(torch.empty(pool_size, len(self.e_layers), 2, e_length, embed_dim).uniform_(-1, 1))
        self.e_keys = nn.Parameter(torch.empty(pool_size, key_dim or embed_dim).uniform_(-1, 1))
        self.register_buffer("n_tasks", torch.zeros((), dtype=torch.long))  # E-prompts trained so far

    @property
    def pool_size(self) -> int:
        return self.e_prompts.shape[0]

    @torch.no_grad()
    def start_task(self, task: int, copy_previous: bool = True) -> None:
        """Make E-prompt ``task`` available; ``copy_previous`` starts it from E-prompt ``task - 1``."""
        if not 0 <= task < self.pool_size:
            raise ValueError(f"task {task} is outside the pool of {self.pool_size} E-prompts")
        if copy_previous and task > 0:
            self.e_prompts[task] = self.e_prompts[task - 1]
        self.n_tasks.fill_(max(int(self.n_tasks), task + 1))

    def select(self, query: torch.Tensor) -> torch.Tensor:
        """``(B,)`` index of the trained E-prompt whose key is nearest to each query (eq. 3)."""
        trained = max(int(self.n_tasks), 1)
        distance = cosine_distance(query.detach().float(), self.e_keys[:trained].detach().float())
        tasks = distance.argmin(dim=1, keepdim=True)
        return (batchwise_majority(tasks, 1) if self.batchwise else tasks).squeeze(1)

    def forward(self, query: torch.Tensor, task: int | None = None) -> PrefixSelection:
        """Prefixes for a batch of queries ``(B, Dk)``: E-prompt ``task`` (training) or key-selected (``None``)."""
        batch = query.shape[0]
        tasks = self.select(query) if task is None else torch.full((batch,), task, dtype=torch.long, device=query.device)
        prefixes = {layer: (g[0], g[1]) for layer, g in zip(self.g_layers, self.g_prompt)}
        chosen = self.e_prompts[tasks]  # (B, layer, 2, L_e, D)
        for i, layer in enumerate(self.e_layers):
            prefixes[layer] = (chosen[:, i, 0], chosen[:, i, 1])
        distance = cosine_distance(query.to(self.e_keys.dtype), self.e_keys)  # (B, pool)
        matching = distance.gather(1, tasks.unsqueeze(1)).mean()
        return PrefixSelection(prefixes, tasks, matching)
