"""Synaptic Intelligence's importance: each parameter's share of the loss decrease along the path.

Zenke, Poole & Ganguli, "Continual Learning Through Synaptic Intelligence", ICML 2017
(https://arxiv.org/abs/1703.04200). Over an experience every step adds
``omega_k += -g_k(t) * Delta theta_k(t)`` (eq. 3), with ``g`` the gradient of the experience's
own loss (not of the penalty) and ``Delta theta`` the update the optimizer actually made; at its
end the importance is ``Omega_k = omega_k / ((Delta_k)^2 + xi)`` (eq. 5), ``Delta_k`` the
parameter's total change over the experience. As Mammoth's ``models/si.py``, ``Omega`` of
successive experiences add up (:class:`~clpeft.components.regularization.quadratic_penalty.QuadraticPenalty`
``online`` with ``gamma = 1``) and the gradient is taken before any clipping.
"""

from __future__ import annotations

import torch
from torch import nn


class PathIntegral(nn.Module):
    """The running ``omega`` of one experience, for the parameters it is started on.

    Call :meth:`start` when the experience starts, :meth:`before_step` once the loss gradient is
    in place (before the penalty's gradient, clipping and the step), :meth:`after_step` after the
    optimizer step, and :meth:`importance` at the end. ``omega`` and the starting point travel in
    the ``state_dict`` (extra state).
    """

    def __init__(self):
        super().__init__()
        self.start_point: dict[str, torch.Tensor] = {}
        self.omega: dict[str, torch.Tensor] = {}
        self._step: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # name -> (gradient, parameter) before the step

    def start(self, named_parameters: dict[str, torch.Tensor]) -> None:
        """Begin an experience at the current parameters, with ``omega = 0``."""
        self.start_point = {n: p.detach().clone() for n, p in named_parameters.items()}
        self.omega = {n: torch.zeros_like(p) for n, p in self.start_point.items()}
        self._step = {}

    @torch.no_grad()
    def before_step(self, named_parameters: dict[str, torch.Tensor]) -> None:
        """Record the loss gradients and the parameters about to be updated."""
        self._step = {
            n: (p.grad.detach().clone(), p.detach().clone()) for n, p in named_parameters.items() if n in self.omega and p.grad is not None
        }

    @torch.no_grad()
    def after_step(self, named_parameters: dict[str, torch.Tensor]) -> None:
        """``omega += -g * (theta_after - theta_before)`` for the step just taken."""
        for n, (g, before) in self._step.items():
            self.omega[n] += g * (before - named_parameters[n].detach())
        self._step = {}

    @torch.no_grad()
    def importance(self, named_parameters: dict[str, torch.Tensor], damping: float) -> dict[str, torch.Tensor]:
        """``Omega = omega / ((theta - theta_start)^2 + xi)`` with ``xi`` = ``damping``."""
        return {n: w / ((named_parameters[n].detach() - self.start_point[n]).pow(2) + damping) for n, w in self.omega.items()}

    def get_extra_state(self) -> dict:
        return {"start_point": dict(self.start_point), "omega": dict(self.omega)}

    def set_extra_state(self, state: dict) -> None:
        self.start_point, self.omega, self._step = dict(state["start_point"]), dict(state["omega"]), {}
