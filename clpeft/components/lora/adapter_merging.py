"""Adapter merging: the current task's adapter pulled towards the mean of the earlier tasks' adapters.

Sun, Zhou, Zhao, Gan, Zhan & Ye, "MOS: Model Surgery for Pre-Trained Model-Based Class-Incremental
Learning", AAAI 2025 (https://arxiv.org/abs/2412.09441), Sec. 4.1, eq. 5. After every optimizer
step the adapter of task ``t`` becomes::

    theta_t <- (1 - beta) theta_t + beta / t * sum_{i < t} theta_i

(every weight and bias of every block's adapter), so the new adapter drifts less from the
subspace the earlier ones span; ``theta_i`` are the adapters as frozen at the end of their tasks
(LAMDA-PILOT ``backbone/vit_mos.py``: ``reweight_adapter`` over the prefix sums of
``sum_adapter_param``). The adapters live in :class:`~clpeft.components.lora.adapter_bank.AdapterBank`
stacks; the new task's adapter starts as a copy of the last one (PILOT never re-initialises its
``cur_adapter``).
"""

from __future__ import annotations

import torch

from clpeft.components.lora.adapter_bank import AdapterBank

_PARTS = (("down_weight", "down_proj", "weight"), ("down_bias", "down_proj", "bias"), ("up_weight", "up_proj", "weight"))
_PARTS += (("up_bias", "up_proj", "bias"),)


def _current_parts(bank: AdapterBank):
    for stack, layer, name in _PARTS:
        yield getattr(bank, stack), getattr(getattr(bank.current, layer), name)


@torch.no_grad()
def start_from_last(bank: AdapterBank) -> None:
    """Set ``bank.current`` to the last frozen adapter's weights (no-op without frozen adapters)."""
    if bank.n_frozen:
        for stack, param in _current_parts(bank):
            param.copy_(stack[-1])


@torch.no_grad()
def merge_towards_mean(bank: AdapterBank, beta: float) -> None:
    """Eq. 5 in place on ``bank.current``: ``(1 - beta) theta + beta * mean of the frozen adapters``."""
    if bank.n_frozen and beta:
        for stack, param in _current_parts(bank):
            param.mul_(1 - beta).add_(stack.mean(dim=0).to(param), alpha=beta)
