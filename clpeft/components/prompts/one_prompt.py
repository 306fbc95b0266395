"""OnePrompt: one set of prefix prompts shared by every task and every input, no pool, no query.

Huang, Chen & Hsu, "OVOR: OnePrompt with Virtual Outlier Regularization for Rehearsal-Free
Class-Incremental Learning", ICLR 2024 (https://openreview.net/forum?id=FbuyDzZTPt), Sec. 3.1.
DualPrompt's placement without its pool: a G-prompt of length ``L_g`` at ``g_layers`` and an
E-prompt of length ``L_e`` at ``e_layers`` (``[0, 1]`` and ``[2, 3, 4]``), both used by prefix
tuning (first half prefix keys, second half prefix values), both trained on every task. With no
pool there is nothing to select, so no query pass: one backbone pass per step and per test batch.

As in the official code (jpmorganchase/ovor ``models/zoo.py``, ``OnePrompt``; lengths count keys
and values together) every prompt starts uniform in ``[0, 1)``, drawn layer by layer, G-prompts
first.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class OnePrompt(nn.Module):
    """A G-prompt and an E-prompt shared by every input, as attention prefixes.

    Args:
        embed_dim: ``D``, the width of the attention's keys and values.
        g_layers: layers that get the G-prompt.
        e_layers: layers that get the E-prompt (disjoint from ``g_layers``).
        g_length: ``L_g``, G-prompt length, keys and values together (even).
        e_length: ``L_e``, E-prompt length, keys and values together (even).
    """

    def __init__(self, embed_dim: int, g_layers: Sequence[int], e_layers: Sequence[int], g_length: int, e_length: int):
        super().__init__()
        if set(g_layers) & set(e_layers):
            raise ValueError(f"G-prompt layers {list(g_layers)} and E-prompt layers {list(e_layers)} overlap")
        if g_length % 2 or e_length % 2:
            raise ValueError(f"prompt lengths must be even (half keys, half values), got {g_length} and {e_length}")
        self.g_layers, self.e_layers = list(g_layers), list(e_layers)
        g = [torch.empty(g_length, embed_dim).uniform_() for _ in self.g_layers]  # the official order of draws
        e = [torch.empty(e_length, embed_dim).uniform_() for _ in self.e_layers]
        self.g_prompt = nn.Parameter(torch.stack(g) if g else torch.zeros(0, g_length, embed_dim))
        self.e_prompt = nn.Parameter(torch.stack(e) if e else torch.zeros(0, e_length, embed_dim))

    def forward(self) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """Prefixes ``{layer: (keys, values)}``, each ``(L / 2, D)``, shared by the batch."""
        prefixes = {}
        for layers, prompts in ((self.g_layers, self.g_prompt), (self.e_layers, self.e_prompt)):
            half = prompts.shape[1] // 2
            for layer, p in zip(layers, prompts):
                prefixes[layer] = (p[:half], p[half:])
        return prefixes
