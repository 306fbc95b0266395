"""Synaptic Intelligence.

Zenke, Poole & Ganguli, "Continual Learning Through Synaptic Intelligence", ICML 2017
(https://arxiv.org/abs/1703.04200). Every step adds each parameter's share of the loss decrease,
``omega_k += -g_k Delta theta_k`` (eq. 3, :class:`~clpeft.components.regularization.path_integral.PathIntegral`);
after an experience ``Omega_k += omega_k / ((Delta_k)^2 + xi)`` (eq. 5), anchored at the current
parameters, and training adds ``c sum_k Omega_k (theta_k - theta*_k)^2`` (eq. 4,
:class:`~clpeft.components.regularization.quadratic_penalty.QuadraticPenalty`, online with ``gamma = 1``).

As Mammoth's ``models/si.py`` (``tests/reference/test_classic_cil.py`` checks the parameters and
``Omega`` after two experiences): ``g`` is the gradient of the cross-entropy alone, the penalty's
gradient is added afterwards (in ``after_backward``, so the logged loss is the cross-entropy), and
every gradient is then clipped to ``[-1, 1]`` (``clip_value``; ``null`` turns it off). Avalanche's
``SynapticIntelligencePlugin`` differs (the total loss's gradient after the step, ``Omega`` clamped
to 0.001, its ``c`` fixed to 1). Mammoth requires ``c`` and ``xi`` (no defaults); the defaults here
are a starting point, not tuned values.

Rank-consistent under ``torchrun`` (``tests/strategies/test_classic_cil_ddp.py``): the path integral reads the
gradients in ``after_backward``, after DDP has averaged them, and the parameter moves, which DDP keeps equal.

Paper symbols: ``c`` -> ``c``, ``xi`` -> ``xi``.
"""

from __future__ import annotations

from typing import Annotated

import torch
from pydantic import Field

from clpeft.components.regularization.path_integral import PathIntegral
from clpeft.components.regularization.quadratic_penalty import QuadraticPenalty
from clpeft.experience import Experience
from clpeft.registry import register_strategy
from clpeft.strategy import Strategy


@register_strategy("si")
class SI(Strategy):
    """Synaptic Intelligence: a quadratic penalty weighted by each parameter's path integral (Zenke et al. 2017).

    Args:
        backbone: the feature extractor.
        c: penalty strength ``c``.
        xi: damping ``xi`` of eq. 5.
        clip_value: clip every gradient to ``[-clip_value, clip_value]`` before the step (Mammoth: 1).
    """

    def __init__(
        self,
        backbone,
        c: Annotated[float, Field(ge=0)] = 0.5,
        xi: Annotated[float, Field(gt=0)] = 1.0,
        clip_value: Annotated[float, Field(gt=0)] | None = 1.0,
    ):
        super().__init__(backbone)
        self.c = c
        self.xi = xi
        self.clip_value = clip_value
        self.penalty = QuadraticPenalty("online", decay=1.0)
        self.path = PathIntegral()

    def _trainable(self) -> dict[str, torch.Tensor]:
        return {n: p for n, p in self.named_parameters() if p.requires_grad}

    def before_experience(self, exp: Experience) -> None:
        super().before_experience(exp)
        self.path.start(self._trainable())

    def after_backward(self) -> None:
        named = self._trainable()
        self.path.before_step(named)  # the cross-entropy's gradient
        if self.penalty.terms:
            with torch.enable_grad():
                penalty = self.c * self.penalty(named)
            for p, g in zip(named.values(), torch.autograd.grad(penalty, list(named.values()), allow_unused=True)):
                if g is not None:
                    p.grad = g if p.grad is None else p.grad + g
        if self.clip_value is not None:
            torch.nn.utils.clip_grad_value_(named.values(), self.clip_value)

    def after_training_step(self) -> bool:
        self.path.after_step(self._trainable())
        return False

    def after_experience(self, exp: Experience) -> None:
        named = self._trainable()
        self.penalty.add(named, self.path.importance(named, self.xi))
