"""Consensus merging with TALL masks: drop the weights that fewer than k tasks rely on.

Wang, Dimitriadis, Ortiz-Jimenez, Fleuret and Frossard, "Localizing Task Information for
Improved Model Merging and Compression", ICML 2024, https://arxiv.org/abs/2405.07813.
With the multi-task vector ``tau_MTL = sum_t tau_t`` (task arithmetic's sum), task ``t``'s
TALL mask keeps the entries where the task's own update outweighs what the
other tasks add:

    m_t = 1{ |tau_t| > lambda_t |tau_MTL - tau_t| }

(``|theta_0 - theta_t| > lambda |theta_MTL - theta_t|`` of the official ``generate_task_masks``).
Consensus merging keeps the entries that at least ``k`` masks keep, removing
"catastrophic" (no task) and "selfish" (one task) weights:

    tau_m = alpha * 1{ sum_t m_t >= k } * tau_MTL.

With ``task: t`` the result is instead the TALL-mask compression's reconstruction of task
``t``: ``alpha * m_t * tau_MTL``, one model per task from the one stored
``tau_MTL`` and a binary mask (the paper's reconstruction is ``scale: 1``); clpeft writes one
model per ``task`` value rather than a mask file, and every mask is recomputed from the
fine-tunes on the fly.

Defaults. ``k`` 2 is the paper's; ``lambda`` is chosen per task on validation data from
{0.2, 0.3, 0.4, 0.5, 0.6} in the official code, clpeft's default 0.4 is that grid's middle
(a list gives one per task); ``alpha`` 0.3 is task arithmetic's default, searched on
validation data in the paper (``--search scale=...``). The masks equal FusionBench's
``tall_mask.utils.generate_task_masks`` (tests/reference/test_fusionbench_methods.py).
"""

from __future__ import annotations

from typing import Annotated

import torch
from pydantic import Field

from clpeft.errors import UserError
from clpeft.merging.methods.generalized import Scale
from clpeft.merging.registry import merge_method

Lambda = Annotated[
    float | list[float],
    Field(description="lambda_t: a TALL mask keeps |tau_t| > lambda_t |tau_MTL - tau_t|; one value, or one per model"),
]
MinTasks = Annotated[int, Field(ge=0, description="k: an entry is kept when at least k tasks' TALL masks keep it")]
Task = Annotated[
    int | None,
    Field(ge=0, description="give task t's TALL-masked reconstruction m_t * tau_MTL instead of the consensus merge (0-based)"),
]


def tall_masks(task_vectors: torch.Tensor, total: torch.Tensor, tall_mask_lambda: float | list[float]) -> torch.Tensor:
    """The ``(K, N)`` boolean TALL masks ``|tau_t| > lambda_t |tau_MTL - tau_t|``."""
    num_tasks = task_vectors.shape[0]
    lambdas = [tall_mask_lambda] * num_tasks if isinstance(tall_mask_lambda, float | int) else tall_mask_lambda
    if len(lambdas) != num_tasks:
        raise UserError(f"has {len(lambdas)} entries for {num_tasks} models", key="parameters.tall_mask_lambda")
    lambdas = torch.tensor(lambdas, dtype=task_vectors.dtype, device=task_vectors.device)[:, None]
    return task_vectors.abs() > (total - task_vectors).abs_().mul_(lambdas)


@merge_method("consensus", reference_url="https://arxiv.org/abs/2405.07813")
def consensus(
    task_vectors: torch.Tensor,
    *,
    tall_mask_lambda: Lambda = 0.4,
    min_tasks: MinTasks = 2,
    scale: Scale = 0.3,
    task: Task = None,
) -> torch.Tensor:
    """Consensus merging: task arithmetic on the entries that at least k tasks' TALL masks keep (Wang et al., ICML 2024)."""
    if task is not None and task >= task_vectors.shape[0]:
        raise UserError(f"task {task} is out of range for {task_vectors.shape[0]} models (0-based)", key="parameters.task")
    total = task_vectors.sum(dim=0)
    masks = tall_masks(task_vectors, total, tall_mask_lambda)
    keep = masks[task] if task is not None else masks.sum(dim=0) >= min_tasks
    return total.mul_(keep).mul_(scale)
