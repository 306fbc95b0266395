"""Methods of the base and exactly one fine-tuned model (SLERP, NearSwap, Arcee Fusion)."""

from __future__ import annotations

import torch

from clpeft.errors import UserError

__all__ = ["single_task_vector"]


def single_task_vector(task_vectors: torch.Tensor, refusal: str) -> torch.Tensor:
    """The one row of ``(1, N)`` task vectors; more or fewer models are refused with ``refusal``,
    a one-line message in which ``{count}`` stands for the number given."""
    if task_vectors.shape[0] != 1:
        raise UserError(refusal.format(count=task_vectors.shape[0]), key="models")
    return task_vectors[0]
