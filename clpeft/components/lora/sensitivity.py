"""AdaLoRA's smoothed sensitivity of parameter entries, shared by the rank allocators.

AdaLoRA (Zhang et al., "Adaptive Budget Allocation for Parameter-Efficient Fine-Tuning",
ICLR 2023, https://arxiv.org/abs/2303.10512, eq. 8-10): per entry ``I = |w * dL/dw|``,
``I_bar = beta1 I_bar + (1 - beta1) I``, ``U_bar = beta2 U_bar + (1 - beta2) |I - I_bar|`` and the
score ``s = I_bar * U_bar``. :class:`~clpeft.components.lora.adalora.AdaLoRAAllocator` scores its
triplets with it, :class:`~clpeft.components.lora.RankAllocator` (IncreLoRA's growth, budget splits)
its layers' ``A`` and ``B``. Parameters may change shape between updates
(grown or pruned layers): the state is zero-padded or cut to the parameter's shape.
"""

from __future__ import annotations

from collections.abc import Hashable

import torch

from clpeft.resizing import zero_padded

__all__ = ["SmoothedSensitivity"]


class SmoothedSensitivity:
    """``I_bar`` and ``U_bar`` per tracked parameter, keyed by any hashable name.

    Args:
        beta1: ``beta_1``, the smoothing of the sensitivity ``I``.
        beta2: ``beta_2``, the smoothing of the uncertainty ``|I - I_bar|``.
    """

    def __init__(self, beta1: float = 0.85, beta2: float = 0.85):
        self.beta1, self.beta2 = beta1, beta2
        self.state: dict[Hashable, tuple[torch.Tensor, torch.Tensor]] = {}

    @torch.no_grad()
    def update(self, key: Hashable, param: torch.Tensor) -> None:
        """Fold ``param``'s current gradient in (a no-op without one)."""
        if param.grad is None:
            return
        i_bar, u_bar = self.state.get(key, (None, None))
        sensitivity = (param * param.grad).abs().float()
        i_bar = zero_padded(i_bar, param, torch.float32).mul_(self.beta1).add_(sensitivity, alpha=1 - self.beta1)
        u_bar = zero_padded(u_bar, param, torch.float32).mul_(self.beta2).add_((sensitivity - i_bar).abs(), alpha=1 - self.beta2)
        self.state[key] = (i_bar, u_bar)

    def score(self, key: Hashable, param: torch.Tensor) -> torch.Tensor:
        """``I_bar * U_bar`` of every entry of ``param`` (zeros where never updated)."""
        i_bar, u_bar = self.state.get(key, (None, None))
        return zero_padded(i_bar, param, torch.float32) * zero_padded(u_bar, param, torch.float32)
