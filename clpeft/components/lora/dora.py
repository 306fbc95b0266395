"""DoRA: a LoRA update of the direction of each weight row, with a trained magnitude per row.

DoRA (Liu et al., "DoRA: Weight-Decomposed Low-Rank Adaptation", ICML 2024,
https://arxiv.org/abs/2402.09353, eq. 5) writes the adapted weight as
``W' = m * (W + s B A) / ||W + s B A||_c``: ``m`` (one entry per output row, initialised to the
row norms of ``W``) and the LoRA factors train; the norm is detached from the gradient (Sec. 4.3).
:class:`DoRALinear` computes it as peft's ``use_dora=True`` does, so outputs, gradients, merged
weights and saved files agree with peft's:
``y = base(x) + (m / n - 1) * W dropout(x) + (m / n) * s B A dropout(x)``.

``W`` here is the weight the current update starts from: the base weight plus the layer's frozen
components, which for DoRA are only a PiSSA start (``init="pissa"``, peft's DoRA on PiSSA's
residual weight). An update cannot be frozen beside the base weight: the magnitude rescales the
whole weight, so retire it with ``old="merge"`` or ``"discard"``. Growing keeps the output
(new components start at zero); pruning keeps the magnitude.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from clpeft.components.lora.layer import LoRALinear
from clpeft.errors import UserError

__all__ = ["DoRALinear"]


class DoRALinear(LoRALinear):
    """A :class:`LoRALinear` whose output rows are renormalised to a trained magnitude ``lora_magnitude_vector``.

    Args are :class:`LoRALinear`'s. ``merge()`` replaces the base weight by ``W'``; ``unmerge()``
    restores it from the row norms kept at merge time.
    """

    kind = "dora"

    def __init__(
        self,
        base: nn.Linear,
        rank: int,
        alpha: float,
        dropout: float = 0.0,
        learnable_scale: bool = False,
        init: Literal["default", "pissa"] = "default",
    ):
        super().__init__(base, rank, alpha, dropout, learnable_scale, init)
        self.lora_magnitude_vector = nn.Parameter(self._weight_norm())
        self.merged_norm: torch.Tensor | None = None

    @torch.no_grad()
    def _weight_norm(self) -> torch.Tensor:
        """``||W + s B A||`` of every output row (detached), ``W`` the start weight."""
        weight = self.effective_weight()
        return (weight + self.delta_weight().to(weight)).norm(dim=1).to(self.lora_A.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        if self.merged:
            return result
        if self.track_importance and self.training:
            self._accumulate(x)
        lora_x = self.lora_dropout(x).to(self.lora_A.dtype)
        weight = self.effective_weight().to(lora_x.dtype)
        norm = (weight + self.delta_weight().detach()).norm(dim=1)
        scale = self.lora_magnitude_vector / norm
        past = self._frozen_output(x) if self.frozen_rank else 0
        if self.training and not isinstance(self.lora_dropout, nn.Identity):
            start = F.linear(lora_x, weight)
        else:  # W x from the base output, as peft does
            bias = self.base_layer.bias
            start = (result if bias is None else result - bias) + past
        delta = past + (scale - 1) * start + scale * self._current_output(lora_x)
        return result + delta.to(result.dtype)

    def _whole_delta(self) -> torch.Tensor:
        """``W' - W_base``: the renormalised weight minus the base weight."""
        weight = self.effective_weight()
        updated = weight + self.delta_weight().to(weight)
        scale = self.lora_magnitude_vector.detach().to(weight) / updated.norm(dim=1)
        return scale[:, None] * updated - self.base_layer.weight.float()

    def combined_factors(self) -> tuple[torch.Tensor, torch.Tensor, float]:
        """Refused: a DoRA update is not a low-rank change of the weight."""
        raise UserError(
            "a DoRA layer's update is not low-rank (its magnitude rescales whole weight rows); "
            "save it with save_adapters or merge() it into the base weight"
        )

    def adapter_tensors(self) -> dict[str, torch.Tensor]:
        """peft's DoRA tensors: the low-rank factors (a PiSSA start included) and ``lora_magnitude_vector``."""
        a, b, alpha = super().combined_factors()
        return {
            "lora_A": a,
            "lora_B": b,
            "lora_alpha": torch.tensor(alpha, dtype=torch.float64),
            "lora_magnitude_vector": self.lora_magnitude_vector.detach(),
        }

    @torch.no_grad()
    def load_adapter_tensors(self, tensors: Mapping[str, torch.Tensor]) -> None:
        if "lora_magnitude_vector" not in tensors:
            raise UserError("the adapter file holds no lora_magnitude_vector for a DoRA layer; inject kind 'lora' to load it")
        super().load_adapter_tensors(tensors)
        self._replace("lora_magnitude_vector", tensors["lora_magnitude_vector"].to(self.lora_magnitude_vector))

    def _fold_into_base(self) -> None:
        """Replace the base weight by ``W' = m (W + s B A) / ||W + s B A||``, keeping the row norms for :meth:`unmerge`."""
        self.merged_norm = self._weight_norm()
        super()._fold_into_base()

    def _unfold_from_base(self) -> None:
        """Restore the base weight: ``W = W' ||W + s B A|| / m - s B A - frozen``."""
        weight = self.base_layer.weight
        ratio = (self.merged_norm / self.lora_magnitude_vector).to(weight)
        low_rank = self.delta_weight() + (self.frozen_delta_weight() if self.frozen_rank else 0)
        weight.copy_(weight * ratio[:, None] - low_rank.to(weight))
        self.merged_norm = None

    def _retire(self, old: str) -> None:
        if old == "freeze":
            raise UserError(
                "a DoRA update cannot be frozen beside the base weight (its magnitude rescales the whole "
                "weight); use old_updates: merge or discard"
            )
        if old == "merge":
            weight = self.base_layer.weight
            weight += self._whole_delta().to(weight.dtype)  # the start components (all frozen ones) included
            self.start_rank = self.frozen_rank
        self._drop_start()

    def _start_update(self, rank: int, alpha: float) -> None:
        super()._start_update(rank, alpha)
        self._replace("lora_magnitude_vector", self._weight_norm())

    def get_extra_state(self) -> dict[str, Any]:
        return {**super().get_extra_state(), "merged_norm": self.merged_norm}

    def set_extra_state(self, state: dict[str, Any]) -> None:
        super().set_extra_state(state)
        self.merged_norm = state.get("merged_norm")
