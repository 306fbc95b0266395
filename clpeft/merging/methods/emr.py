"""EMR-Merging: elect a unified task vector, then mask and rescale it for each task.

Huang et al., "EMR-Merging: Tuning-Free High-Performance Model Merging", NeurIPS 2024,
https://arxiv.org/abs/2405.17461 (Elect, Mask & Rescale):

1. Elect: ``gamma_uni = sgn(sum_t tau_t)``; ``epsilon_uni = max_t |tau_t|`` over the tasks whose
   entry agrees with ``gamma_uni``; the unified task vector ``tau_uni = gamma_uni * epsilon_uni``;
2. Mask: ``M_t = 1{ tau_t * tau_uni > 0 }``;
3. Rescale: ``lambda_t = sum |tau_t| / sum |M_t * tau_uni|``;
4. task ``t``'s model is ``theta_0 + lambda_t M_t * tau_uni``.

EMR gives one model per task, not one merged model. clpeft's ``emr`` writes the unified model
``theta_0 + tau_uni`` (no ``task``) or task ``t``'s model (``task: t``): one merge per task,
each recomputing the masks from the fine-tunes, rather than a unified model plus a mask file.
``lambda_t`` sums over the whole model: a one-sweep whole-model statistic of the engine
(:class:`~clpeft.merging.registry.ModelStatistic`) computes every task's before the merge;
a direct call on one tensor treats that tensor as the whole model.

As the official code (``emr_merge`` of harveyhuang18/EMR_Merging, FusionBench's
``emr_merging.utils.emr_merge``; equal to the latter, tests/reference/test_fusionbench_methods.py),
a zero sum elects ``-`` and the "sums" of step 3 add each tensor's *mean* magnitude, so every
tensor weighs alike whatever its size. A task whose mask is empty everywhere gets
``lambda_t = 0`` where the official code divides by zero.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any

import torch
from pydantic import Field

from clpeft.errors import UserError
from clpeft.merging.registry import ModelShape, merge_method

Task = Annotated[int | None, Field(ge=0, description="give task t's model lambda_t M_t * tau_uni instead of the unified one (0-based)")]


def _elect_(task_vectors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(gamma_uni, epsilon_uni, aligned)``, in place: ``aligned[t]`` is ``|tau_t|`` where the
    task agrees with ``gamma_uni`` and 0 elsewhere, so ``M_t = aligned[t] > 0``."""
    sign = torch.where(task_vectors.sum(dim=0) > 0, 1.0, -1.0).to(task_vectors.dtype)
    aligned = task_vectors.mul_(sign).clamp_(min=0)
    return sign, aligned.amax(dim=0), aligned


def _mean_magnitudes_(task_vectors: torch.Tensor) -> torch.Tensor:
    """``(2, K)``: each task's ``mean |tau_t|`` and ``mean |M_t * tau_uni|`` over one tensor (overwrites it)."""
    own = task_vectors.abs().mean(dim=1)
    _, magnitude, aligned = _elect_(task_vectors)
    masked = (aligned > 0).to(magnitude.dtype) @ magnitude / magnitude.numel()
    return torch.stack([own, masked])


def _rescalers(totals: torch.Tensor) -> torch.Tensor:
    own, masked = totals
    return torch.where(masked > 0, own / masked.clamp(min=torch.finfo(masked.dtype).tiny), 0.0)


class Rescalers:
    """Every task's ``lambda_t`` over the whole model (one sweep)."""

    def __init__(self, shape: ModelShape):
        self.totals = torch.zeros(2, shape.num_tasks, dtype=torch.float64, device=shape.device)
        self.swept = False

    def wants_sweep(self) -> bool:
        return not self.swept

    def observe(self, task_vectors: torch.Tensor) -> None:
        self.totals += _mean_magnitudes_(task_vectors)

    def end_sweep(self) -> None:
        self.swept = True

    def result(self) -> torch.Tensor:
        return _rescalers(self.totals)


def _model_rescalers(params: Mapping[str, Any], shape: ModelShape) -> Rescalers | None:
    return None if params["task"] is None else Rescalers(shape)


@merge_method("emr", reference_url="https://arxiv.org/abs/2405.17461", model_statistic=_model_rescalers)
def emr(task_vectors: torch.Tensor, *, task: Task = None, model_statistic: torch.Tensor | None = None) -> torch.Tensor:
    """EMR-Merging: the elected unified task vector, or task t's masked and rescaled copy of it (Huang et al., NeurIPS 2024)."""
    if task is None:
        sign, magnitude, _ = _elect_(task_vectors)
        return magnitude.mul_(sign)
    if task >= task_vectors.shape[0]:
        raise UserError(f"task {task} is out of range for {task_vectors.shape[0]} models (0-based)", key="parameters.task")
    rescalers = model_statistic if model_statistic is not None else _rescalers(_mean_magnitudes_(task_vectors.clone()))
    sign, magnitude, aligned = _elect_(task_vectors)
    return magnitude.mul_(aligned[task] > 0).mul_(sign).mul_(rescalers[task].to(magnitude.dtype))
