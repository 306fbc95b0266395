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

Consensus TIES. With ``merge: ties``, ``tau_MTL`` is TIES' merged task vector
(:func:`~clpeft.merging.methods.ties.multi_task_vector`) for both the masks and the merge,
while ``tau_t`` in the masks stays each untrimmed task vector: the official code's
``use_ties: true`` (``ties_merging(tv_flat_checks, reset_thresh=20, merge_func="dis-sum")`` in
``src/eval/aggregation.py``, whose result feeds ``construct_tall_mask`` and the consensus
mask), the paper's "Consensus TIES" rows. TIES' keys (``density``, ``trim``, ``trim_scope``,
``disjoint``) mean what they mean for :mod:`~clpeft.merging.methods.ties`; the defaults are that
call's: density 0.2 over the whole model, disjoint sum. Equal to the official code on random
state dicts (tests/reference/test_ties_variants.py), up to TIES' deliberate differences (one
entry per task fewer kept, the sign of an exactly cancelling entry).

Defaults. ``k`` 2 is the paper's; ``lambda`` is chosen per task on validation data from
{0.2, 0.3, 0.4, 0.5, 0.6} in the official code, clpeft's default 0.4 is that grid's middle
(a list gives one per task); ``alpha`` 0.3 is task arithmetic's default, searched on
validation data in the paper (``--search scale=...``). The masks equal FusionBench's
``tall_mask.utils.generate_task_masks`` (tests/reference/test_fusionbench_methods.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any

import torch
from pydantic import Field

from clpeft.errors import UserError
from clpeft.merging.methods.generalized import Disjoint, Scale
from clpeft.merging.methods.model_trim import KthLargestMagnitude
from clpeft.merging.methods.sparsify import Trim
from clpeft.merging.methods.ties import Density, MultiTask, TrimScope, model_thresholds, multi_task_vector
from clpeft.merging.registry import ModelShape, merge_method

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


def _ties_thresholds(params: Mapping[str, Any], shape: ModelShape) -> KthLargestMagnitude | None:
    """TIES' whole-model trim thresholds (``merge: ties``, ``trim_scope: model``)."""
    return model_thresholds(params, shape) if params["merge"] == "ties" else None


@merge_method("consensus", reference_url="https://arxiv.org/abs/2405.07813", model_statistic=_ties_thresholds)
def consensus(
    task_vectors: torch.Tensor,
    *,
    tall_mask_lambda: Lambda = 0.4,
    min_tasks: MinTasks = 2,
    scale: Scale = 0.3,
    task: Task = None,
    merge: MultiTask = "task_arithmetic",
    density: Density = 0.2,
    trim: Trim = "threshold",
    trim_scope: TrimScope = "model",
    disjoint: Disjoint = "sum",
    model_statistic: torch.Tensor | None = None,
) -> torch.Tensor:
    """Consensus merging: task arithmetic (or TIES) on the entries that at least k tasks' TALL masks keep (Wang et al., ICML 2024)."""
    if task is not None and task >= task_vectors.shape[0]:
        raise UserError(f"task {task} is out of range for {task_vectors.shape[0]} models (0-based)", key="parameters.task")
    merged = task_vectors.clone() if merge == "ties" else task_vectors  # TIES trims its input; the masks need every tau_t
    total = multi_task_vector(merged, merge, density=density, trim=trim, disjoint=disjoint, thresholds=model_statistic)
    masks = tall_masks(task_vectors, total, tall_mask_lambda)
    keep = masks[task] if task is not None else masks.sum(dim=0) >= min_tasks
    return total.mul_(keep).mul_(scale)
