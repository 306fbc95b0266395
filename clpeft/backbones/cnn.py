"""A small randomly initialised BatchNorm ResNet for fast CPU experiments.

Residual blocks after He et al., "Deep Residual Learning for Image Recognition", CVPR 2016
(https://arxiv.org/abs/1512.03385): a 3x3 stem, then one stage per width, each of
``blocks`` basic blocks (two 3x3 conv + BatchNorm, identity or 1x1 projection shortcut); every
stage after the first halves the resolution; global average pooling gives the features.
Its BatchNorm layers make it the offline source model for test-time adaptation (Tent, EATA,
CoTTA adapt BatchNorm), and it trains on 28x28 Fashion-MNIST in seconds per epoch on a CPU.
"""

from __future__ import annotations

from typing import Annotated

import torch
from pydantic import Field
from torch import nn

from clpeft.backbones.random_init import RandomInitBackbone
from clpeft.errors import UserError
from clpeft.registry import register_backbone


class _BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


@register_backbone("cnn")
class CNNBackbone(RandomInitBackbone):
    """Small BatchNorm ResNet on raw images (random init; a TTA source model, not pretrained).

    Args:
        input_shape: ``(C, H, W)`` or ``(H, W)`` of one raw image (supplied by the scenario).
        widths: channels of each stage; the last is the feature dimension.
        blocks: basic blocks per stage.
        freeze: keep the random weights fixed.
        scale: ``uint8`` inputs are divided by this (255: pixels to [0, 1]); float inputs are
            taken as already in [0, 1].
        weights: a clpeft run directory, its ``model.safetensors``, a ``clpeft merge`` output, or
            a file of this backbone's ``state_dict()``; loaded strictly (every tensor must fit).
    """

    def __init__(
        self,
        input_shape: tuple[int, ...],
        widths: list[int] = [16, 32, 64],
        blocks: Annotated[int, Field(ge=1)] = 1,
        freeze: bool = False,
        scale: Annotated[float, Field(gt=0)] = 255.0,
        weights: str | None = None,
    ):
        super().__init__()
        if not widths or any(w <= 0 for w in widths):
            raise UserError("expected a non-empty list of positive widths", key="backbone.widths")
        if blocks < 1:
            raise UserError("expected at least one block per stage", key="backbone.blocks")
        if len(input_shape) not in (2, 3):
            raise UserError(
                f"the cnn backbone takes images (C, H, W) or (H, W), not inputs of shape {tuple(input_shape)}", key="backbone.name"
            )
        self.in_channels = input_shape[0] if len(input_shape) == 3 else 1
        self.scale = float(scale)
        self._widths = list(widths)
        self._blocks = blocks
        self.stem = nn.Sequential(nn.Conv2d(self.in_channels, widths[0], 3, 1, 1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU())
        stages, c_in = [], widths[0]
        for i, w in enumerate(widths):
            for j in range(blocks):
                stages.append(_BasicBlock(c_in, w, stride=2 if i > 0 and j == 0 else 1))
                c_in = w
        self.stages = nn.Sequential(*stages)
        self.feature_dim = widths[-1]
        self.load_weights(weights, freeze)

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 3:
            x = x.unsqueeze(1)
        return x.float() / self.scale if x.dtype == torch.uint8 else x.float()

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(self.stem(x)).mean(dim=(2, 3))

    def describe(self) -> dict:
        return self.with_weights(
            {"class": "cnn", "widths": self._widths, "blocks": self._blocks, "scale": self.scale, "in_channels": self.in_channels}
        )
