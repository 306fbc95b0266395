"""Sharpness-aware minimisation (SAM) as a test-time optimizer (SAR).

Foret et al., "Sharpness-Aware Minimization for Efficiently Improving Generalization", ICLR 2021
(https://arxiv.org/abs/2010.01412), eq. 2-3, as SAR uses it (Niu et al., ICLR 2023,
https://arxiv.org/abs/2302.12400, eq. 4-5): with the gradient ``g`` of the loss at ``w``,

    e = rho g / ||g||_2,     w <- step(w, grad L(w + e)),

the norm taken over all adapted parameters together (``+ 1e-12``), the base optimizer's step
taken at ``w`` with the gradient computed at ``w + e``. The base optimizer is SGD with plain
(not Nesterov) momentum, as SAR's code (``SAM(params, torch.optim.SGD, lr, momentum)`` in
Döbler et al.'s benchmark, ``methods/sar.py``); ``optimizer: adam`` gives SAM over Adam.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from clpeft.components.tta.online_adaptation import AdaptationOptimizer


class SharpnessAwareOptimizer(AdaptationOptimizer):
    """SAM over the test-time optimizer (SGD with plain momentum, or Adam); state in ``state_dict``.

    Args:
        optimizer, lr, momentum, weight_decay: the base optimizer (:class:`AdaptationOptimizer`'s
            meanings, but SGD's momentum is plain, SAR's).
        rho: radius ``rho`` of the weight perturbation (0.05 in SAR).
    """

    def __init__(self, optimizer: str = "sgd", lr: float = 1e-3, momentum: float = 0.9, weight_decay: float = 0.0, rho: float = 0.05):
        super().__init__(optimizer, lr, momentum, weight_decay)
        self.rho = rho

    def bind(self, params: list[nn.Parameter]) -> None:
        if self.kind != "sgd":
            return super().bind(params)
        if self.bound and [id(p) for p in self._optimizer.param_groups[0]["params"]] == [id(p) for p in params]:
            return
        self._optimizer = torch.optim.SGD(params, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)
        if self._pending is not None:
            self._optimizer.load_state_dict(self._pending)
            self._pending = None

    def sharpness_aware_step(self, loss: torch.Tensor, perturbed_loss: Callable[[], torch.Tensor]) -> torch.Tensor:
        """One SAM step: ``loss`` is ``L(w)`` (with its graph), ``perturbed_loss()`` recomputes the
        loss at the current weights (called at ``w + e``). Returns ``L(w + e)``, detached.

        A loss without samples (``nan`` mean of nothing) has zero gradients, so the weights are
        not perturbed and the base optimizer steps on zero gradients (its momentum still moves
        them), as in the authors' code.
        """
        params = self._optimizer.param_groups[0]["params"]
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        with torch.no_grad():
            norm = torch.stack([g.norm(2) for g in grads if g is not None]).norm(2)
            scale = self.rho / (norm + 1e-12)
            saved = [p.detach().clone() for p in params]
            for p, g in zip(params, grads):
                if g is not None:
                    p.add_(g * scale)
        self._optimizer.zero_grad(set_to_none=True)
        second = perturbed_loss()
        second.backward()
        with torch.no_grad():
            for p, w in zip(params, saved):
                p.copy_(w)
        self._optimizer.step()
        self._optimizer.zero_grad(set_to_none=True)
        return second.detach()
