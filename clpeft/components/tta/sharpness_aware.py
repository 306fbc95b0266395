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

import torch
from torch import nn

from clpeft.components.tta.online_adaptation import AdaptationOptimizer


class SharpnessAwareOptimizer(AdaptationOptimizer):
    """SAM over the test-time optimizer (SGD with plain momentum, or Adam); state in ``state_dict``.

    Args:
        optimizer, lr, momentum, weight_decay: the base optimizer (:class:`AdaptationOptimizer`'s
            meanings, but SGD's momentum is plain, SAR's).
        rho: radius ``rho`` of the weight perturbation (0.05 in SAR).

    One step: :meth:`ascend` on ``L(w)``, then :meth:`descend` on ``L(w + e)``, which the caller
    computes in between.
    """

    def __init__(self, optimizer: str = "sgd", lr: float = 1e-3, momentum: float = 0.9, weight_decay: float = 0.0, rho: float = 0.05):
        super().__init__(optimizer, lr, momentum, weight_decay)
        self.rho = rho
        self._source: list[torch.Tensor] | None = None  # w between ascend and descend

    def bind(self, params: list[nn.Parameter]) -> None:
        if self.kind != "sgd":
            return super().bind(params)
        if self.bound and [id(p) for p in self._optimizer.param_groups[0]["params"]] == [id(p) for p in params]:
            return
        self._optimizer = torch.optim.SGD(params, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay, foreach=True)
        if self._pending is not None:
            self._optimizer.load_state_dict(self._pending)
            self._pending = None

    def ascend(self, loss: torch.Tensor) -> None:
        """SAM's first half: the gradient ``g`` of ``loss = L(w)`` (with its graph), and the adapted
        weights moved to ``w + e`` (eq. 4); :meth:`descend` completes the step. ``w`` is kept, the
        gradients are freed: nothing of this pass outlives it into the perturbed one (on a CPU, a
        gradient left alive splits the heap that pass reuses and costs page faults).

        A loss without samples (``nan`` mean of nothing) has zero gradients, so the weights are
        not perturbed and the base optimizer steps on zero gradients (its momentum still moves
        them), as in the authors' code.
        """
        params = self._optimizer.param_groups[0]["params"]
        self._optimizer.zero_grad(set_to_none=True)
        loss.backward()
        with torch.no_grad():
            moved = [p for p in params if p.grad is not None]
            grads = [p.grad for p in moved]
            scale = self.rho / (torch.stack(torch._foreach_norm(grads)).norm(2) + 1e-12)
            self._source = [p.detach().clone() for p in params]
            torch._foreach_add_(moved, torch._foreach_mul(grads, scale))
        self._optimizer.zero_grad(set_to_none=True)

    def descend(self, loss: torch.Tensor) -> torch.Tensor:
        """SAM's second half: ``loss = L(w + e)`` computed at the weights :meth:`ascend` left, the
        weights back at ``w`` and the base optimizer's step there with its gradient (eq. 5).
        Returns ``L(w + e)``, detached."""
        params = self._optimizer.param_groups[0]["params"]
        loss.backward()
        with torch.no_grad():
            torch._foreach_copy_(params, self._source)
        self._source = None
        self._optimizer.step()
        self._optimizer.zero_grad(set_to_none=True)
        return loss.detach()
