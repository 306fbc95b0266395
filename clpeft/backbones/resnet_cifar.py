"""Mammoth's ResNet-18 for 32-pixel images, trained from scratch (the Seq-CIFAR-10 backbone).

He et al., "Deep Residual Learning for Image Recognition", CVPR 2016 (https://arxiv.org/abs/1512.03385), in the CIFAR
form of Mammoth's ``backbone/ResNetBlock.py`` (``resnet18``; ``reduced-resnet18`` is ``num_filters: 20``, the network of
Lopez-Paz & Ranzato, "Gradient Episodic Memory for Continual Learning", NeurIPS 2017), on which Buzzega et al., "Dark
Experience for General Continual Learning: a Strong, Simple Baseline", NeurIPS 2020 (https://arxiv.org/abs/2004.07211)
report Seq-CIFAR-10: a 3x3 stride-1 stem convolution + BatchNorm + ReLU and no max-pool, four stages of two basic blocks
of ``nf, 2 nf, 4 nf, 8 nf`` channels (strides 1, 2, 2, 2; a 1x1 projection shortcut where the shape changes), then
global average pooling: ``8 nf`` features (512 at ``nf = 64``). PyTorch's default initialisation, as Mammoth's.

Images are normalised per channel first, ``(x - mean) / std`` with ``x`` in [0, 1], as the ``Normalize`` ending
Mammoth's seq-cifar10 transforms (its ``MEAN``, ``STD`` are the defaults). Parameter names are Mammoth's (``conv1``,
``bn1``, ``layer1`` ... ``layer4``), so a Mammoth network's state dict without its ``classifier.*`` loads as
``weights``. Equal to Mammoth's network on the same weights: ``tests/backbones/test_resnet_cifar.py``.
"""

from __future__ import annotations

from typing import Annotated

import torch
from pydantic import Field
from torch import nn

from clpeft.backbones.cnn import _BasicBlock
from clpeft.backbones.random_init import RandomInitBackbone
from clpeft.errors import UserError
from clpeft.registry import register_backbone

BLOCKS = (2, 2, 2, 2)  # ResNet-18
CIFAR10_MEAN = [0.4914, 0.4822, 0.4465]  # Mammoth's SequentialCIFAR10.MEAN, STD
CIFAR10_STD = [0.2470, 0.2435, 0.2615]


def _stage(c_in: int, c_out: int, n_blocks: int, stride: int) -> nn.Sequential:
    return nn.Sequential(*(_BasicBlock(c_in if i == 0 else c_out, c_out, stride if i == 0 else 1) for i in range(n_blocks)))


@register_backbone("resnet18_cifar")
class ResNet18CIFAR(RandomInitBackbone):
    """Mammoth's ResNet-18 for 32 px images (3x3 stem, no max-pool, 8 nf features; random init, trainable).

    Args:
        input_shape: ``(C, H, W)`` or ``(H, W)`` of one raw image (supplied by the scenario).
        num_filters: width ``nf`` of the first stage (Mammoth's ``num_filters``): 64 is ``resnet18``, 20 ``reduced-resnet18``.
        mean: per-channel mean subtracted from [0, 1] images (default: Mammoth's Seq-CIFAR-10 ``MEAN``).
        std: per-channel standard deviation they are divided by (default: Mammoth's Seq-CIFAR-10 ``STD``).
        freeze: keep the weights fixed.
        weights: a clpeft run directory, its ``model.safetensors``, a ``clpeft merge`` output, or a state dict under
            this backbone's (Mammoth's) names; loaded strictly (every tensor must fit).
    """

    def __init__(
        self,
        input_shape: tuple[int, ...],
        num_filters: Annotated[int, Field(ge=1, le=1024)] = 64,
        mean: list[float] = CIFAR10_MEAN,
        std: list[Annotated[float, Field(gt=0)]] = CIFAR10_STD,
        freeze: bool = False,
        weights: str | None = None,
    ):
        super().__init__()
        if len(input_shape) not in (2, 3):
            raise UserError(
                f"resnet18_cifar takes images (C, H, W) or (H, W), not inputs of shape {tuple(input_shape)}", key="backbone.name"
            )
        channels = input_shape[0] if len(input_shape) == 3 else 1
        if len(mean) != channels or len(std) != channels:
            raise UserError(f"mean and std need one value per image channel ({channels})", key="backbone.mean")
        nf = num_filters
        self._settings = {"num_filters": nf, "mean": list(mean), "std": list(std), "in_channels": channels}
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)
        self.conv1 = nn.Conv2d(channels, nf, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(nf)
        widths = [nf, 2 * nf, 4 * nf, 8 * nf]
        self.layer1, self.layer2, self.layer3, self.layer4 = (
            _stage(widths[max(i - 1, 0)], w, n, 1 if i == 0 else 2) for i, (w, n) in enumerate(zip(widths, BLOCKS))
        )
        self.feature_dim = widths[-1]
        self.load_weights(weights, freeze)

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 3:
            x = x.unsqueeze(1)
        x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
        return (x - self.mean) / self.std

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return out.mean(dim=(2, 3))

    def describe(self) -> dict:
        return self.with_weights({"class": "resnet18_cifar", **self._settings})
