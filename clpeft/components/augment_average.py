"""Augmentation-averaged predictions in one batched forward (CoTTA).

Wang et al., "Continual Test-Time Domain Adaptation", CVPR 2022
(https://arxiv.org/abs/2203.13591), eq. 4: the teacher's pseudo-label is the average of its
predictions on ``N`` random augmentations of the test batch,

    y'_aug = 1/N sum_{i=1..N} f_teacher(aug_i(x)),

(used when the source model's mean confidence is below a threshold). The reference code runs a
Python loop of ``N`` augment + forward calls; :func:`augmentation_average` builds all ``N * B``
augmented images in one call and runs one forward under ``torch.func.vmap`` over the ``N``
augmentations, so BatchNorm layers that normalise with batch statistics still see each
augmentation's batch separately: the result equals the loop's
(:func:`augmentation_average_loop`, kept as the reference) up to float rounding. Stacking
saves per-call overhead, which is what a GPU pays for; on a CPU the forward of one large batch
is slower than ``N`` smaller ones (measured), so there only the augmentation is stacked.

:class:`TTAugment` is CoTTA's CIFAR augmentation on tensors, with parameters drawn per image:
brightness, contrast and gamma jitter, a random affine map (rotation, translation, scale) with
edge padding, a small Gaussian blur, horizontal flip and Gaussian noise, clipped to [0, 1].
CoTTA's saturation and hue jitter are omitted (no-ops on grayscale; add them for colour data)
and the colour jitter runs in a fixed order.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F


class TTAugment:
    """Random per-image augmentation of ``(B, C, H, W)`` images (CoTTA's default ranges).

    Images are ``uint8`` (returned as ``uint8``) or floats in [0, 1] (returned as floats).
    Parameters are drawn by :meth:`sample` and applied by :meth:`apply`, so the same draw can be
    applied in one call or in chunks.

    Args:
        rotate: maximum rotation in degrees.
        translate: maximum translation as a fraction of the image size.
        scale: range of the zoom factor.
        brightness, contrast, gamma: ranges of the multiplicative jitters.
        blur_sigma: range of the Gaussian-blur standard deviation (pixels, 5x5 kernel).
        flip: probability of a horizontal flip (use 0 for digits and text-like images).
        noise_std: standard deviation of the additive Gaussian noise (in [0, 1] units).
    """

    def __init__(self, rotate: float = 15.0, translate: float = 1 / 16, scale: tuple[float, float] = (0.9, 1.1),
                 brightness: tuple[float, float] = (0.6, 1.4), contrast: tuple[float, float] = (0.7, 1.3),
                 gamma: tuple[float, float] = (0.7, 1.3), blur_sigma: tuple[float, float] = (0.001, 0.5),
                 flip: float = 0.5, noise_std: float = 0.005):
        self.rotate = rotate
        self.translate = translate
        self.scale = scale
        self.brightness = brightness
        self.contrast = contrast
        self.gamma = gamma
        self.blur_sigma = blur_sigma
        self.flip = flip
        self.noise_std = noise_std

    def sample(self, shape: torch.Size | tuple[int, ...], generator: torch.Generator | None = None,
               device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """Draw the parameters for a batch of images of ``shape``; every entry has ``shape[0]`` rows."""
        n = shape[0]

        def uniform(lo, hi):
            return lo + (hi - lo) * torch.rand(n, generator=generator)

        params = {
            "brightness": uniform(*self.brightness),
            "contrast": uniform(*self.contrast),
            "gamma": uniform(*self.gamma),
            "angle": uniform(-self.rotate, self.rotate) * math.pi / 180,
            "shift": (torch.rand(n, 2, generator=generator) * 2 - 1) * self.translate * 2,  # in [-1, 1] grid units
            "zoom": uniform(*self.scale),
            "sigma": uniform(*self.blur_sigma),
            "flip": torch.rand(n, generator=generator) < self.flip,
            "noise": torch.randn(tuple(shape), generator=generator) * self.noise_std,
        }
        return {k: v.to(device) for k, v in params.items()}

    def apply(self, images: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        """Augment ``images`` with drawn ``params`` (rows matched one to one)."""
        as_uint8 = images.dtype == torch.uint8
        x = images.float() / 255.0 if as_uint8 else images.float()
        col = lambda v: v.view(-1, 1, 1, 1)  # noqa: E731
        x = (x * col(params["brightness"])).clamp(0, 1)
        gray = x.mean(dim=(1, 2, 3), keepdim=True)
        x = (gray + col(params["contrast"]) * (x - gray)).clamp(0, 1)
        x = x.clamp_min(1e-8) ** col(params["gamma"])
        x = self._affine(x, params)
        x = self._blur(x, params["sigma"])
        x = torch.where(col(params["flip"]), x.flip(-1), x)
        x = (x + params["noise"]).clamp(0, 1)
        return (x * 255.0).round().to(torch.uint8) if as_uint8 else x

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return self.apply(images, self.sample(images.shape, generator, images.device))

    @staticmethod
    def _affine(x: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        cos, sin = torch.cos(params["angle"]), torch.sin(params["angle"])
        inv = 1.0 / params["zoom"]  # the grid maps output to input coordinates
        theta = torch.stack([
            torch.stack([cos * inv, -sin * inv, params["shift"][:, 0]], dim=1),
            torch.stack([sin * inv, cos * inv, params["shift"][:, 1]], dim=1),
        ], dim=1)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)

    @staticmethod
    def _blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        offsets = torch.arange(-2, 3, device=x.device, dtype=x.dtype)
        k1 = torch.exp(-(offsets.view(1, -1) ** 2) / (2 * sigma.view(-1, 1) ** 2))
        k1 = k1 / k1.sum(1, keepdim=True)  # (n, 5)
        k2 = (k1.unsqueeze(2) * k1.unsqueeze(1)).repeat_interleave(c, dim=0).unsqueeze(1)  # (n*c, 1, 5, 5)
        padded = F.pad(x.reshape(1, n * c, h, w), (2, 2, 2, 2), mode="replicate")
        return F.conv2d(padded, k2, groups=n * c).view(n, c, h, w)


def _draw(x: torch.Tensor, augment: TTAugment, n: int, generator: torch.Generator | None) -> dict[str, torch.Tensor]:
    return augment.sample((n * x.shape[0], *x.shape[1:]), generator, x.device)


STACK_ON_CPU = 32  # images (n * B) up to which one stacked forward beats per-augmentation forwards on a CPU


def augmentation_average(model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, augment: TTAugment,
                         n: int, generator: torch.Generator | None = None, stacked: bool | None = None) -> torch.Tensor:
    """Mean of ``model``'s logits over ``n`` augmentations of ``x``.

    ``stacked=True``: one augment call and one forward over all ``n * B`` images, vmapped over
    the augmentations (per-augmentation batch statistics); rows ``i*B .. (i+1)*B`` of the drawn
    parameters are augmentation ``i``. ``False`` runs :func:`augmentation_average_loop` (same
    draws, same result). ``None`` (default): the single forward on CUDA, and on a CPU for at most
    ``STACK_ON_CPU`` images in all; above that, on a CPU, one augment call over all ``n * B``
    images, then one forward per augmentation, because there the cost of a convolution per image
    grows with the batch once activations outgrow the caches: ``benchmarks/tta_bench.py``
    (``cnn`` backbone, 28x28 images, N = 16, one thread) measured the single forward 1.8x and
    1.5x faster than the loop at B = 1 and 2 (per-call overhead dominates), even at B = 4, and
    1.6x and 2.6x slower at B = 16 and 64, while the stacked augmentation alone is 2-4x faster
    than the loop's.
    """
    b = x.shape[0]
    if stacked is False:
        return augmentation_average_loop(model, x, augment, n, generator)
    params = _draw(x, augment, n, generator)
    images = augment.apply(x.repeat(n, *([1] * (x.dim() - 1))), params).view(n, b, *x.shape[1:])
    if stacked or (stacked is None and (x.is_cuda or n * b <= STACK_ON_CPU)):
        return torch.func.vmap(model, randomness="different")(images).mean(0)
    total = model(images[0])
    for i in range(1, n):
        total = total + model(images[i])
    return total / n


def augmentation_average_loop(model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, augment: TTAugment,
                              n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """The reference: a Python loop of ``n`` augment + forward calls (CoTTA's code), drawing the
    same parameters as :func:`augmentation_average`."""
    b = x.shape[0]
    params = _draw(x, augment, n, generator)
    total = None
    for i in range(n):
        chunk = {k: v[i * b:(i + 1) * b] for k, v in params.items()}
        out = model(augment.apply(x, chunk))
        total = out if total is None else total + out
    return total / n
