"""AdaLoRA's budget schedule run within each experience of a continual learner, one update at a time.

AdaLoRA (Zhang et al., "Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning",
ICLR 2023, https://arxiv.org/abs/2303.10512) trains an SVD-form update ``P Lambda Q`` on the loss
plus ``gamma R(P, Q)`` (eq. 4-5; :func:`~clpeft.components.lora.adalora.orthogonal_penalty`, in
peft's form) and masks its singular values *during* training (eq. 6-7): ``t_i`` warm-up steps at
the initial budget, then a cubic fall to ``target_rank`` per layer by step ``T - t_f`` (the global
budget scheduler, Section 3.3), re-masking every ``Delta T`` steps by each triplet's smoothed
sensitivity times uncertainty (eq. 8-12). The schedule and the masking are
:class:`~clpeft.components.lora.adalora.AdaLoRAAllocator` (peft's ``RankAllocator`` and
``update_and_allocate``); this module runs one of them per experience.

:class:`AdaLoRASchedule` starts a fresh allocator on each experience's new update (``T`` counts
that experience's optimizer steps) and, when the experience ends, drops the masked triplets
(``lambda_i = 0``, so the output is unchanged) before the update is frozen or merged: a frozen
update keeps the ranks the schedule allocated. How it relates to the other allocation of the
family (:mod:`~clpeft.components.lora.rank_allocation`): IncreLoRA grows whole layers and the
``rank_budget`` split prunes after training, both by the same smoothed sensitivity
(:class:`~clpeft.components.lora.sensitivity.SmoothedSensitivity`); AdaLoRA masks single
triplets across all layers while the update trains.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Annotated

import torch
from pydantic import Field, model_validator

from clpeft.components.lora.adalora import AdaLoRAAllocator, AdaLoRALinear, orthogonal_penalty
from clpeft.errors import UserError
from clpeft.schema import Options

__all__ = ["AdaLoRAOptions", "AdaLoRASchedule", "check_schedule"]


class AdaLoRAOptions(Options):
    """AdaLoRA's schedule over each experience's update, with peft's ``AdaLoraConfig`` names."""

    target_rank: Annotated[int, Field(ge=1)] | None = Field(
        None,
        description="AdaLoRA's ``target_r``: each experience's update is masked while it trains down to this average rank "
        "per layer (``null``: no schedule); needs ``adapter: adalora``.",
    )
    total_step: Annotated[int, Field(ge=1)] | None = Field(
        None,
        description="AdaLoRA's ``T``: the optimizer steps of each experience's schedule (``null``: the steps the engine "
        "plans for the experience, ``train.epochs`` x its batches per epoch).",
    )
    tinit: Annotated[int, Field(ge=0)] = Field(0, description="AdaLoRA's ``t_i``: warm-up steps of each experience at the starting budget.")
    tfinal: Annotated[int, Field(ge=0)] = Field(
        0, description="AdaLoRA's ``t_f``: the last steps of each experience, trained with the final mask."
    )
    delta_t: Annotated[int, Field(ge=1)] = Field(
        1, description="AdaLoRA's ``Delta T`` (peft's ``deltaT``): steps between two maskings while the budget falls."
    )
    orth_reg_weight: Annotated[float, Field(ge=0)] = Field(
        0.5, description="AdaLoRA's ``gamma``: weight of the orthogonal regulariser ``R(P, Q)`` added to the loss."
    )

    @model_validator(mode="after")
    def _complete(self) -> AdaLoRAOptions:
        if self.target_rank is None:
            given = sorted(self.changed())
            if given:
                raise UserError(f"{', '.join(given)} belong to AdaLoRA's schedule; set target_rank too", key=f"strategy.{given[0]}")
            return self
        if self.total_step is not None:
            self.check_steps(self.total_step)
        return self

    def check_steps(self, total_step: int) -> None:
        """Refuse a schedule whose warm-up and final phase leave no step for the budget to fall."""
        if self.tinit >= total_step - self.tfinal:
            raise UserError(
                f"AdaLoRA needs tinit < total_step - tfinal, got tinit={self.tinit}, tfinal={self.tfinal}, total_step={total_step}; "
                "lower tinit or tfinal, or train longer",
                key="strategy.tinit",
            )


def check_schedule(params: Mapping) -> None:
    """Refuse, in one line, schedule options that are incomplete or that the other options of a LoRA learner cannot follow.

    ``params``: the learner's flat options (those of :class:`AdaLoRAOptions` among them).
    """
    if AdaLoRAOptions(**{name: params[name] for name in AdaLoRAOptions.model_fields if name in params}).target_rank is None:
        return
    clashes = {
        "adapter": (params.get("adapter", "lora") != "adalora", "masks singular values, so it needs adapter: adalora"),
        "grow_every": (params.get("grow_every") is not None, "sets the ranks that IncreLoRA's growth would change; drop grow_every"),
        "rank_budget": (params.get("rank_budget") is not None, "sets the budget itself (target_rank per layer); drop rank_budget"),
        "subspace": (params.get("subspace", "none") != "none", "trains A, which InfLoRA/GPM design and freeze; use subspace: none"),
    }
    for key, (clash, reason) in clashes.items():
        if clash:
            raise UserError(f"target_rank (AdaLoRA's schedule) {reason}", key=f"strategy.{key}")


class AdaLoRASchedule:
    """One AdaLoRA schedule per experience over the current updates of a learner's layers.

    Args:
        options: the schedule's :class:`AdaLoRAOptions` (``target_rank`` set).
        beta: AdaLoRA's ``beta_1 = beta_2``, the smoothing of the scores.
    """

    def __init__(self, options: AdaLoRAOptions, beta: float):
        self.options, self.beta = options, beta
        self.allocator: AdaLoRAAllocator | None = None
        self.step = 0  # optimizer steps of the experience under way
        self.total_step = options.total_step  # T of the experience under way

    def start(self, layers: Mapping[str, AdaLoRALinear], planned_steps: int | None = None) -> None:
        """Begin an experience: a fresh allocator over the layers' new updates, the step count at 0.

        ``planned_steps``: the experience's optimizer steps as the engine plans them, ``T`` when
        ``total_step`` is not given.
        """
        o = self.options
        self.total_step = o.total_step or planned_steps
        if self.total_step is None:
            raise UserError("AdaLoRA's schedule needs total_step here (no planned step count to take it from)", key="strategy.total_step")
        o.check_steps(self.total_step)
        self.allocator = AdaLoRAAllocator(
            layers, o.target_rank, self.total_step, tinit=o.tinit, tfinal=o.tfinal, delta_t=o.delta_t, beta1=self.beta, beta2=self.beta
        )
        self.step = 0

    def penalty(self) -> torch.Tensor:
        """``gamma R(P, Q)`` of the current updates, to add to the loss."""
        return self.options.orth_reg_weight * orthogonal_penalty(self.allocator.layers)

    def after_step(self) -> dict[str, torch.Tensor] | None:
        """After each optimizer step, the gradients in place: score, and mask on the schedule.

        Returns:
            Each layer's kept triplets when a mask was computed at this step, else None.
        """
        self.step += 1
        return self.allocator.step(self.step)

    @torch.no_grad()
    def finish(self) -> None:
        """End the experience: drop every layer's zero singular values (the masked triplets; output unchanged).

        Warns when the experience ended before step ``T - t_f``: its budget never reached the target.
        """
        final = self.total_step - self.options.tfinal
        if self.step < final:
            budget = self.allocator.budget(self.step)[0]
            warnings.warn(
                f"adalora: the experience trained {self.step} optimizer steps, fewer than total_step - tfinal = {final}, so its "
                f"budget stopped at {budget} instead of {self.allocator.target_budget}; set total_step to its optimizer steps",
                stacklevel=2,
            )
        for layer in self.allocator.layers.values():
            layer.prune(int(layer.lora_E.ne(0).sum()))
        self.allocator = None
