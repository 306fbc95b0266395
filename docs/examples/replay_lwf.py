"""Replay plus distillation: a class-balanced memory and LwF's loss on the old classes.

The combination iCaRL trains with (Rebuffi et al., "iCaRL: Incremental Classifier and
Representation Learning", CVPR 2017, https://arxiv.org/abs/1611.07725): each experience trains on
its data and a memory of past samples, and the previous model's outputs on the old classes are
distilled (Li & Hoiem, "Learning without Forgetting", ECCV 2016, eq. 2). With a frozen backbone
the previous model is the previous head. The tutorial ``docs/adding_a_strategy.md`` builds it.

Run it from YAML: ``strategy: {name: docs/examples/replay_lwf.py:ReplayLwF, mem_size: 100}``.
"""

from __future__ import annotations

from typing import Annotated

import torch
import torch.nn.functional as F
from pydantic import Field

from clpeft import Strategy, UserError
from clpeft.components import ReplayBuffer
from clpeft.components.regularization.distillation import distillation_loss, frozen_copy


class ReplayLwF(Strategy):
    """Replay and LwF distillation on a frozen backbone (Rebuffi et al. 2017; Li & Hoiem 2016).

    Args:
        backbone: a frozen feature extractor.
        mem_size: memory capacity ``M`` in samples (iCaRL's ``K``).
        alpha: weight ``lambda_o`` of the distillation loss.
        temperature: distillation temperature ``T``.
    """

    def __init__(
        self,
        backbone,
        mem_size: Annotated[int, Field(ge=0)] = 200,
        alpha: Annotated[float, Field(ge=0)] = 1.0,
        temperature: Annotated[float, Field(gt=0)] = 2.0,
    ):
        super().__init__(backbone)
        self.check_config({"alpha": alpha, "mem_size": mem_size})  # the same rule when built from Python
        self.memory = ReplayBuffer(mem_size, "class_balanced")
        self.alpha = alpha
        self.temperature = temperature
        self.teacher = None

    @classmethod
    def check_config(cls, params: dict) -> None:
        """A rule spanning two keys, checked when a config is resolved (and by ``__init__``)."""
        if params["alpha"] > 0 and params["mem_size"] == 0:
            raise UserError("distillation without a memory is LwF: set mem_size > 0 or use strategy: lwf", key="strategy.mem_size")

    def before_experience(self, exp):
        self.teacher = frozen_copy(self.head) if self.head.n_classes else None  # before the head grows
        super().before_experience(exp)

    def train_data(self, exp):
        return exp.train + self.memory.view(exp.past)

    def training_step(self, batch):
        features = self.embed(batch.x)  # cached features: the backbone is frozen
        logits = self.head(features)
        loss = F.cross_entropy(logits, batch.y)
        if self.teacher is not None:
            with torch.no_grad():
                old = self.teacher(features)
            loss = loss + self.alpha * distillation_loss(logits, old, self.temperature)
        return loss

    def after_experience(self, exp):
        self.teacher = None
        self.memory.update(exp)
