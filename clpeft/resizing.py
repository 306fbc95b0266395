"""State that follows a parameter whose size changes during training.

A dynamic-rank LoRA layer grows mid-experience (IncreLoRA): its factors are replaced by larger
ones, with components appended at the end of one dimension. Whatever is kept per entry of such a
parameter (optimizer moments, importance averages) must follow: the existing entries keep their
values, the appended ones start at zero, as they would for a newly added parameter.

Parameters are replaced, never resized in place: autograd keeps a parameter's shape in its
gradient accumulator, so after ``param.data = larger`` a graph still alive would silently
deliver gradients of the old shape.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

__all__ = ["replace_parameters", "zero_padded"]


def zero_padded(state: torch.Tensor | None, like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``state`` in the leading corner of a zero tensor shaped like ``like`` (on its device).

    Zeros when ``state`` is None or larger than ``like`` in some dimension (after pruning the
    positions no longer correspond to the same entries). ``dtype``: ``state``'s by default.
    ``state`` itself (no copy) when it already has that shape, dtype and device: the common case
    of a per-step update between growths.
    """
    dtype = dtype or (state.dtype if state is not None else like.dtype)
    if state is not None and state.shape == like.shape and state.dtype == dtype and state.device == like.device:
        return state
    fresh = torch.zeros(like.shape, dtype=dtype, device=like.device)
    if state is not None and state.dim() == like.dim() and all(s <= n for s, n in zip(state.shape, like.shape)):
        fresh[tuple(slice(0, s) for s in state.shape)] = state
    return fresh


@torch.no_grad()
def replace_parameters(optimizer: torch.optim.Optimizer, before: Mapping[str, nn.Parameter], after: Mapping[str, nn.Parameter]) -> int:
    """Put the parameters that replaced others (same name, new object) into ``optimizer``.

    Each takes its predecessor's place in its parameter group (so its learning rate and schedule)
    and its per-entry state, zero-padded to the new shape (Adam's ``exp_avg``/``exp_avg_sq``,
    SGD's ``momentum_buffer``); scalar state such as Adam's ``step`` is kept.

    Args:
        before: the named parameters the optimizer was built with.
        after: the named parameters now.

    Returns:
        The number of parameters replaced.
    """
    replaced = {id(old): after[name] for name, old in before.items() if name in after and after[name] is not old}
    for group in optimizer.param_groups:
        for i, param in enumerate(group["params"]):
            new = replaced.get(id(param))
            if new is None:
                continue
            group["params"][i] = new
            state = optimizer.state.pop(param, None)
            if state:
                optimizer.state[new] = {k: zero_padded(v, new) if torch.is_tensor(v) and v.dim() else v for k, v in state.items()}
    return len(replaced)
