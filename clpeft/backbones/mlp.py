"""A small randomly initialised MLP backbone for fast tests and toy streams."""

from __future__ import annotations

import math
from typing import Annotated

import torch
from pydantic import Field
from torch import nn

from clpeft.backbones.random_init import RandomInitBackbone
from clpeft.errors import UserError
from clpeft.registry import register_backbone

MAX_WEIGHTS = 2**31  # 8 GiB of fp32: beyond this a toy backbone is a typo


@register_backbone("mlp")
class MLPBackbone(RandomInitBackbone):
    """Random-init MLP on flattened inputs (for tests and quick experiments, not a pretrained model).

    Args:
        input_shape: shape of one raw sample (supplied by the scenario).
        hidden: widths of the hidden layers; the last one is the feature dimension.
        freeze: keep the random weights fixed (a random-feature baseline).
        scale: inputs are divided by this before the first layer (255 for uint8 images).
        weights: a clpeft run directory, its ``model.safetensors``, a ``clpeft merge`` output, or
            a file of this backbone's ``state_dict()``; loaded strictly (every tensor must fit).
    """

    def __init__(
        self,
        input_shape: tuple[int, ...],
        hidden: list[int] = [128],
        freeze: bool = False,
        scale: Annotated[float, Field(gt=0)] = 255.0,
        weights: str | None = None,
    ):
        super().__init__()
        if not hidden or any(h <= 0 for h in hidden):
            raise UserError("expected a non-empty list of positive widths", key="backbone.hidden")
        self.scale = float(scale)
        self._hidden = list(hidden)
        dims = [math.prod(input_shape), *hidden]
        n_weights = sum(a * b for a, b in zip(dims[:-1], dims[1:]))
        if n_weights > MAX_WEIGHTS:
            raise UserError(
                f"widths {hidden} need {n_weights:.3g} weights (limit {MAX_WEIGHTS:.0e}); use smaller widths", key="backbone.hidden"
            )
        layers: list[nn.Module] = []
        for a, b in zip(dims[:-1], dims[1:]):
            layers += [nn.Linear(a, b), nn.ReLU()]
        self.net = nn.Sequential(*layers)
        self.feature_dim = dims[-1]
        self.load_weights(weights, freeze)

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1).float() / self.scale

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def describe(self) -> dict:
        return self.with_weights({"class": "mlp", "hidden": self._hidden, "scale": self.scale})
