"""AugMix views of one image, as MEMO draws them.

Hendrycks et al., "AugMix: A Simple Data Processing Method to Improve Robustness and
Uncertainty", ICLR 2020 (https://arxiv.org/abs/1912.02781), Algorithm 1, with the operations
and levels MEMO uses (Zhang et al., "MEMO: Test Time Robustness via Adaptation and
Augmentation", NeurIPS 2022, https://arxiv.org/abs/2110.09506; Döbler et al.'s benchmark,
``augmentations/transforms_augmix.py`` and ``augmix_ops.py``). One view of an image ``x``:

1. pre-augmentation ``x_o``: a random 0-padded crop (4 pixels, ``crop``, the CIFAR setting) or a
   random resized crop (``resized_crop``, the ImageNet setting) to the image size, then a
   horizontal flip with probability 0.5 (torchvision's transforms, torch's generator);
2. ``w ~ Dirichlet(1, 1, 1)``, ``m ~ Beta(1, 1)``; three chains, each of 1-3 operations drawn
   uniformly from autocontrast, equalize, posterize, rotate, solarize, shear x/y, translate x/y
   (PIL, bilinear; none overlaps the corruptions of ImageNet-C) at severity ``s`` (level
   ``U(0.1, s)``, signs by a fair coin);
3. ``m x_o + (1 - m) sum_i w_i chain_i(x_o)``, as floats in [0, 1].

:meth:`AugMix.views` returns the image itself followed by ``n`` such views. Draws come from the
component's numpy ``RandomState`` (legacy draws, in the reference's order: a state seeded like
numpy's global one draws the reference's views), saved in the ``state_dict``.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from PIL import Image, ImageOps
from torch import nn
from torchvision import transforms
from torchvision.transforms import functional as TF

PreAugment = Literal["crop", "resized_crop"]


def _level(rng: np.random.RandomState, severity: float, maximum: float) -> float:
    return rng.uniform(low=0.1, high=severity) * maximum / 10.0


def _signed(rng: np.random.RandomState, value: float) -> float:
    return -value if rng.uniform() > 0.5 else value


def _posterize(img, rng, severity, _size):
    return ImageOps.posterize(img, 4 - int(_level(rng, severity, 4)))


def _rotate(img, rng, severity, _size):
    return img.rotate(_signed(rng, int(_level(rng, severity, 30))), resample=Image.BILINEAR)


def _solarize(img, rng, severity, _size):
    return ImageOps.solarize(img, 256 - int(_level(rng, severity, 256)))


def _affine(img, size, coefficients):
    return img.transform((size, size), Image.AFFINE, coefficients, resample=Image.BILINEAR)


def _shear_x(img, rng, severity, size):
    return _affine(img, size, (1, _signed(rng, _level(rng, severity, 0.3)), 0, 0, 1, 0))


def _shear_y(img, rng, severity, size):
    return _affine(img, size, (1, 0, 0, _signed(rng, _level(rng, severity, 0.3)), 1, 0))


def _translate_x(img, rng, severity, size):
    return _affine(img, size, (1, 0, _signed(rng, int(_level(rng, severity, size / 3))), 0, 1, 0))


def _translate_y(img, rng, severity, size):
    return _affine(img, size, (1, 0, 0, 0, 1, _signed(rng, int(_level(rng, severity, size / 3)))))


OPERATIONS = (
    lambda img, *_: ImageOps.autocontrast(img),
    lambda img, *_: ImageOps.equalize(img),
    _posterize,
    _rotate,
    _solarize,
    _shear_x,
    _shear_y,
    _translate_x,
    _translate_y,
)


class AugMix(nn.Module):
    """MEMO's AugMix views of single images (the authors' operations and severity 1 as defaults).

    Args:
        preaugment: ``crop`` (pad 4 and crop, CIFAR) or ``resized_crop`` (ImageNet), each then flipped.
        severity: ``s``, the operations' strength (1 in MEMO).
        width: chains mixed per view (3).
        max_depth: the most operations in a chain (3; each chain draws 1 .. ``max_depth``).
    """

    def __init__(self, preaugment: PreAugment = "crop", severity: float = 1.0, width: int = 3, max_depth: int = 3):
        super().__init__()
        self.preaugment = preaugment
        self.severity = severity
        self.width = width
        self.max_depth = max_depth
        self.rng = np.random.RandomState(0)

    def seed(self, seed: int) -> None:
        self.rng = np.random.RandomState(seed)

    def views(self, image: torch.Tensor, n: int) -> torch.Tensor:
        """``(1 + n, C, H, W)`` floats in [0, 1]: ``image`` (``uint8`` ``(C, H, W)``, or floats in
        [0, 1]) followed by ``n`` AugMix views of it."""
        pil = TF.to_pil_image(image if image.dtype == torch.uint8 else (image * 255).round().to(torch.uint8))
        size = pil.size[0]
        if self.preaugment == "crop":
            pre = transforms.Compose([transforms.RandomCrop(size, padding=4), transforms.RandomHorizontalFlip()])
        else:
            pre = transforms.Compose([transforms.RandomResizedCrop(size), transforms.RandomHorizontalFlip()])
        out = [TF.to_tensor(pil)]
        for _ in range(n):
            original = pre(pil)
            weights = np.float32(self.rng.dirichlet([1.0] * self.width))
            m = np.float32(self.rng.beta(1.0, 1.0))
            mix = torch.zeros_like(out[0])
            for w in weights:
                chain = original.copy()
                for _ in range(self.rng.randint(1, self.max_depth + 1)):
                    chain = OPERATIONS[self.rng.randint(0, len(OPERATIONS))](chain, self.rng, self.severity, size)
                mix += w * TF.to_tensor(chain)
            out.append(m * TF.to_tensor(original) + (1 - m) * mix)
        return torch.stack(out)

    def get_extra_state(self) -> dict:
        """The numpy generator's state as plain data (a checkpoint holds no numpy objects)."""
        kind, keys, position, has_gauss, gauss = self.rng.get_state()
        return {"rng": [kind, torch.from_numpy(keys.astype(np.int64)), int(position), int(has_gauss), float(gauss)]}

    def set_extra_state(self, state: dict) -> None:
        kind, keys, position, has_gauss, gauss = state["rng"]
        self.rng = np.random.RandomState()
        self.rng.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, gauss))
