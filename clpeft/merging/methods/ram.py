"""RAM: Reinforced Agent Merging, averaging the shared updates and keeping the unique ones whole.

Yuan et al., "Behavior Knowledge Merge in Reinforced Agentic Models", 2026,
https://arxiv.org/abs/2601.13572 (mergekit's ``ram``, ``mergekit/merge_methods/ram.py``).
RL fine-tunes change few weights, and different ones, so averaging dense task vectors dilutes
each agent's update by the number of agents. Per tensor, entry ``i`` of task vector ``tau_k``
contributes when ``|tau_k,i| > epsilon``; with ``c_i`` the number of contributing models,
``tau_m,i = sum_k [|tau_k,i| > epsilon] tau_k,i / max(c_i, 1)``: an entry changed by one model
keeps that model's value (unique), one changed by several gets their mean (shared), one changed
by none stays the base's. ``ramplus_tl`` also rescales the unique entries
(:mod:`~clpeft.merging.methods.ramplus_tl`).

Equal to mergekit's ``ram`` up to float rounding (tests/reference/test_mergekit_more.py).
"""

from __future__ import annotations

from typing import Annotated

import torch
from pydantic import Field

from clpeft.merging.registry import merge_method

Epsilon = Annotated[float, Field(ge=0.0, description="epsilon: |tau| above which an entry counts as changed by a model")]


def contributions_(task_vectors: torch.Tensor, epsilon: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero the entries with ``|tau| <= epsilon`` in place; the mask of the others ``(K, N)`` and
    how many models contribute to each entry ``(N,)``."""
    changed = task_vectors.abs() > epsilon
    task_vectors.mul_(changed)
    return changed, changed.sum(dim=0)


def shared_mean(task_vectors: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """``sum_k tau_k / max(c, 1)`` of task vectors zeroed outside their contributions."""
    return task_vectors.sum(dim=0).div_(counts.clamp(min=1))


@merge_method("ram", reference_url="https://arxiv.org/abs/2601.13572")
def ram(task_vectors: torch.Tensor, *, epsilon: Epsilon = 1e-5) -> torch.Tensor:
    """RAM: mean of the changed entries where several models change them, the one model's value where one does (Yuan et al., 2026)."""
    _, counts = contributions_(task_vectors, epsilon)
    return shared_mean(task_vectors, counts)
