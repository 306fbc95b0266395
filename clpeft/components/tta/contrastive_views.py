"""AdaContrast's weak and strong views of a test batch (the benchmark's "twss" MoCo-v2-light transforms).

Chen et al., "Contrastive Test-Time Adaptation", CVPR 2022 (https://arxiv.org/abs/2204.10377),
and Döbler et al.'s benchmark (``augmentations/transforms_adacontrast.py``, ``get_augmentation_versions(
"twss", "moco-v2-light")`` for CIFAR-sized images): per image, a weak view (a horizontal flip with
probability 0.5; the resize and the full-size random crop change nothing) and two strong views
(random resized crop of 20-100 % of the area, grayscale with probability 0.2, colour jitter 0.4 of
brightness, contrast, saturation and hue, horizontal flip). The benchmark builds them in its data
loader on PIL images; here torchvision's same transforms run on the ``uint8`` tensor of each
image, drawing from torch's generator in the loader's order (per image: weak, strong, strong).
PIL and tensor back-ends round colour operations differently, so pixels may differ by a few
levels from the PIL pipeline's.
"""

from __future__ import annotations

import torch
from torchvision import transforms


def _as_uint8(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.uint8 else (x.clamp(0, 1) * 255).round().to(torch.uint8)


class ContrastiveViews:
    """The weak view and two strong views of every image of a batch (floats in [0, 1])."""

    def __init__(self, size: tuple[int, int]):
        self.weak = transforms.RandomHorizontalFlip()
        self.strong = transforms.Compose(
            [
                transforms.RandomResizedCrop(size, scale=(0.2, 1.0)),
                transforms.RandomGrayscale(p=0.2),
                transforms.ColorJitter(0.4, 0.4, 0.4, 0.4),
                transforms.RandomHorizontalFlip(),
            ]
        )

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(weak, strong_q, strong_k)`` of the ``(B, C, H, W)`` batch ``x`` (``uint8`` or floats in [0, 1])."""
        views = [[], [], []]
        for image in _as_uint8(x).cpu():
            for i, transform in enumerate((self.weak, self.strong, self.strong)):
                views[i].append(transform(image))
        return tuple(torch.stack(v).to(x.device).float() / 255 for v in views)
