"""CoTTA's test-time augmentation of an image batch, with the draws of the authors' code.

Wang et al., "Continual Test-Time Domain Adaptation", CVPR 2022
(https://arxiv.org/abs/2203.13591): the random augmentation whose teacher predictions CoTTA
averages (eq. 4); Döbler et al.'s benchmark (github.com/mariodoebler/test-time-adaptation,
``augmentations/transforms_cotta.py``) uses the same one for CoTTA and RMT. One augmentation
draws **one** set of parameters for the whole batch and applies, to images in [0, 1]:

1. clip to [0, 1];
2. colour jitter in a random order of five operations: brightness ``f x`` (``f ~ U(0.6, 1.4)``),
   contrast, blending each image with its mean luma (``U(0.7, 1.3)``), saturation, blending with
   the luma image (``U(0.5, 1.5)``), hue, shifting the HSV hue by ``U(-0.06, 0.06)`` of a turn,
   and gamma ``x^g`` after clamping to ``[1e-8, 1]`` (``U(0.7, 1.3)``); every step but gamma
   clips to [0, 1]; luma is ``0.2989 R + 0.587 G + 0.114 B``; one-channel images skip
   saturation and hue (as torchvision does);
3. edge padding by half the image size, then a random affine map about the centre: rotation
   ``U(-15, 15)`` degrees, a translation by a whole number of pixels ``round(U(-1, 1) t W_pad)``
   (``t = 1/16`` of the padded image: up to ``W/8``), zoom ``U(0.9, 1.1)``, bilinear, zero fill
   outside the padded image, which torchvision blends in by the sampled coverage ``m`` as
   ``x m + 0 (1 - m)`` of the already zero-padded sample (so ``m^2`` times the edge-clamped value);
4. a 5 x 5 Gaussian blur, ``sigma ~ U(0.001, 0.5)``;
5. the centre crop back to the input size; a horizontal flip with probability 0.5;
6. Gaussian noise of standard deviation 0.005, then clip to [0, 1].

ROID and CMF (Marsden et al., WACV 2024; Lee et al., ICLR 2024) use the benchmark's variant
``get_tta_transforms(padding_mode="reflect", cotta_augs=False)``: reflect padding (the image
mirrored about its border pixels, torch's ``reflect``), and neither blur nor noise, whose
parameters are then not drawn (``blur_sigma=None``, ``noise_std=None``); the final clip stays.

Only the crop (plus the blur's 2-pixel margin) of the padded image is ever computed: for images
of at least 4 pixels the blur's reflection at the padded border never reaches the crop, so the
result is the reference's. The reference pads and crops both axes by the height; here each
axis uses its own size (the same for square images). Outputs are floats; ``uint8`` inputs are
divided by 255 first and never re-quantised.

Draws come from torch's generator in the reference's order, per augmentation: the permutation
of the colour operations, their five factors in that order, angle, horizontal and vertical
shift, zoom, blur ``sigma``, the flip, the noise image. A run seeded like the reference therefore
draws exactly the reference's augmentations (on a CPU; on a GPU the noise image is drawn there).
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F

LUMA = (0.2989, 0.587, 0.114)
COLOUR_OPERATIONS = ("brightness", "contrast", "saturation", "hue", "gamma")
BLUR_RADIUS = 2  # 5 x 5 kernel


class TTAugment:
    """CoTTA's augmentation (the authors' ranges as defaults), one draw per batch.

    Args:
        rotate: maximum rotation in degrees.
        translate: maximum translation as a fraction of the padded (twice as large) image.
        scale: range of the zoom factor.
        brightness, contrast, saturation, gamma: ranges of the multiplicative colour factors.
        hue: range of the hue shift (fraction of a turn).
        blur_sigma: range of the Gaussian blur's standard deviation (pixels, 5 x 5 kernel);
            ``None``: no blur (and no draw of ``sigma``).
        flip: probability of a horizontal flip (use 0 for digits and text-like images).
        noise_std: standard deviation of the additive Gaussian noise (in [0, 1] units);
            ``None``: no noise (and no draw of the noise image).
        padding: how the image is padded before the affine map: ``edge`` (CoTTA) or ``reflect`` (ROID).

    :meth:`sample` draws the parameters of ``n`` augmentations and :meth:`apply` applies them
    (to ``n`` copies of a batch, in one call); calling the object draws and applies one.
    """

    def __init__(
        self,
        rotate: float = 15.0,
        translate: float = 1 / 16,
        scale: tuple[float, float] = (0.9, 1.1),
        brightness: tuple[float, float] = (0.6, 1.4),
        contrast: tuple[float, float] = (0.7, 1.3),
        saturation: tuple[float, float] = (0.5, 1.5),
        hue: tuple[float, float] = (-0.06, 0.06),
        gamma: tuple[float, float] = (0.7, 1.3),
        blur_sigma: tuple[float, float] | None = (0.001, 0.5),
        flip: float = 0.5,
        noise_std: float | None = 0.005,
        padding: Literal["edge", "reflect"] = "edge",
    ):
        self.rotate = rotate
        self.translate = translate
        self.scale = scale
        self.colour_ranges = (brightness, contrast, saturation, hue, gamma)
        self.blur_sigma = blur_sigma
        self.flip = flip
        self.noise_std = noise_std
        self.padding = padding

    def sample(
        self, n: int, shape: torch.Size | tuple[int, ...], generator: torch.Generator | None = None, device: torch.device | str = "cpu"
    ) -> dict[str, torch.Tensor]:
        """Parameters of ``n >= 1`` augmentations of a batch of ``shape`` ``(B, C, H, W)``: one row
        per augmentation (``noise``: ``(n, B, C, H, W)``; ``sigma`` and ``noise`` only when blur and noise are on)."""
        h, w = shape[-2:]
        padded_h, padded_w = h + 2 * (h // 2), w + 2 * (w // 2)

        def uniform(low: float, high: float) -> float:
            return torch.empty(()).uniform_(low, high, generator=generator).item()

        rows = {k: [] for k in ("order", "colour", "angle", "shift", "zoom", "sigma", "flip")}
        noise = []
        on_cpu = torch.device(device).type == "cpu"
        for _ in range(n):
            order = torch.randperm(len(COLOUR_OPERATIONS), generator=generator)
            colour = [0.0] * len(COLOUR_OPERATIONS)
            for op in order.tolist():
                colour[op] = uniform(*self.colour_ranges[op])
            rows["order"].append(order)
            rows["colour"].append(colour)
            rows["angle"].append(uniform(-self.rotate, self.rotate))
            max_x, max_y = self.translate * padded_w, self.translate * padded_h
            rows["shift"].append([round(uniform(-max_x, max_x)), round(uniform(-max_y, max_y))])
            rows["zoom"].append(uniform(*self.scale))
            if self.blur_sigma is not None:
                rows["sigma"].append(uniform(*self.blur_sigma))
            rows["flip"].append(bool(torch.rand(1, generator=generator) < self.flip))
            if self.noise_std is not None:
                noise.append(torch.randn(tuple(shape), generator=generator if on_cpu else None, device=device))
        params = {
            "order": torch.stack(rows["order"]),
            "colour": torch.tensor(rows["colour"], dtype=torch.float32).view(n, len(COLOUR_OPERATIONS)),
            "angle": torch.tensor(rows["angle"], dtype=torch.float64),
            "shift": torch.tensor(rows["shift"], dtype=torch.float64).view(n, 2),
            "zoom": torch.tensor(rows["zoom"], dtype=torch.float64),
            "flip": torch.tensor(rows["flip"], dtype=torch.bool),
        }
        if self.blur_sigma is not None:
            params["sigma"] = torch.tensor(rows["sigma"], dtype=torch.float32)
        params = {k: v.to(device) for k, v in params.items()}
        if self.noise_std is not None:
            params["noise"] = torch.stack(noise) * self.noise_std
        return params

    def apply(self, images: torch.Tensor, params: dict[str, torch.Tensor]) -> torch.Tensor:
        """The ``n`` augmentations drawn in ``params`` of the batch ``images`` ``(B, C, H, W)``:
        ``(n * B, C, H, W)`` floats, augmentation ``i`` in rows ``i * B .. (i + 1) * B``."""
        n = params["order"].shape[0]
        b, c, h, w = images.shape
        if c not in (1, 3):
            raise ValueError(f"CoTTA's augmentation takes 1- or 3-channel images, not {c} channels")
        if min(h, w) < 2 * BLUR_RADIUS:
            raise ValueError(f"CoTTA's augmentation needs images of at least {2 * BLUR_RADIUS} pixels, not {h} x {w}")
        x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        x = x.clamp(0, 1).unsqueeze(0).repeat(n, 1, 1, 1, 1)  # (n, B, C, H, W)
        x = _jitter(x, params["order"], params["colour"])
        margin = BLUR_RADIUS if "sigma" in params else 0
        x = _affine_crop(x.view(n * b, c, h, w), params, n, margin, self.padding)
        x = x.view(n, b, c, h + 2 * margin, w + 2 * margin)
        if "sigma" in params:
            x = _blur(x, params["sigma"])
        x = torch.where(params["flip"].view(n, 1, 1, 1, 1), x.flip(-1), x)
        if "noise" in params:
            x = x + params["noise"]
        return x.clamp(0, 1).reshape(n * b, c, h, w)

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """One augmentation of ``images`` (one draw for the whole batch)."""
        return self.apply(images, self.sample(1, images.shape, generator, images.device))


def _luma(x: torch.Tensor) -> torch.Tensor:
    """``(..., 1, H, W)`` luma of ``(..., C, H, W)`` images (the image itself for one channel)."""
    if x.shape[-3] == 1:
        return x
    r, g, b = x.unbind(-3)
    return (LUMA[0] * r + LUMA[1] * g + LUMA[2] * b).unsqueeze(-3)


def _blend(x: torch.Tensor, other: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    return (factor * x + (1 - factor) * other).clamp(0, 1)


def _colour(x: torch.Tensor, op: int, factor: torch.Tensor) -> torch.Tensor:
    """Colour operation ``COLOUR_OPERATIONS[op]`` on ``(m, B, C, H, W)`` with one factor per row ``m``."""
    name = COLOUR_OPERATIONS[op]
    f = factor.view(-1, 1, 1, 1, 1)
    if name == "brightness":
        return (f * x).clamp(0, 1)
    if name == "contrast":
        return _blend(x, _luma(x).mean(dim=(-3, -2, -1), keepdim=True), f)
    if name == "gamma":
        return x.clamp(1e-8, 1.0).pow(f).clamp(0, 1)
    if x.shape[-3] == 1:
        return x
    if name == "saturation":
        return _blend(x, _luma(x), f)
    return _shift_hue(x, f)


def _jitter(x: torch.Tensor, order: torch.Tensor, colour: torch.Tensor) -> torch.Tensor:
    """The five colour operations, augmentation ``i`` in its own order ``order[i]`` (in place)."""
    for position in range(order.shape[1]):
        for op in range(len(COLOUR_OPERATIONS)):
            rows = (order[:, position] == op).nonzero().flatten()
            if len(rows) == x.shape[0]:
                x = _colour(x, op, colour[:, op])
            elif len(rows):
                x.index_copy_(0, rows, _colour(x.index_select(0, rows), op, colour[rows, op]))
    return x


def _shift_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate the HSV hue of RGB images by ``shift`` (fraction of a turn, broadcast over pixels)."""
    r, g, b = x.unbind(-3)
    value = x.amax(-3)
    chroma = value - x.amin(-3)
    grey = chroma == 0
    saturation = chroma / torch.where(grey, torch.ones_like(value), value)
    safe = torch.where(grey, torch.ones_like(chroma), chroma)
    red_max = value == r
    green_max = (value == g) & ~red_max
    sector = torch.where(red_max, (g - b) / safe, torch.where(green_max, 2.0 + (b - r) / safe, 4.0 + (r - g) / safe))
    hue6 = (torch.fmod(sector / 6.0 + 1.0, 1.0) + shift.squeeze(-3)) % 1.0 * 6.0
    # back to RGB: channel c = v - v s clamp(min(k, 4 - k), 0, 1), k = (n_c + 6 h) mod 6, n = 5, 3, 1
    drop = value * saturation
    channels = []
    for n in (5.0, 3.0, 1.0):
        k = (hue6 + n) % 6.0
        channels.append(value - drop * torch.minimum(k, 4.0 - k).clamp(0, 1))
    return torch.stack(channels, dim=-3)


def _affine_crop(
    x: torch.Tensor, params: dict[str, torch.Tensor], n: int, margin: int = BLUR_RADIUS, padding: str = "edge"
) -> torch.Tensor:
    """Padding by half the size (``edge`` or ``reflect``), the drawn affine maps about the centre
    (torchvision's bilinear ``RandomAffine`` with zero fill), evaluated only on the centre crop
    plus ``margin`` pixels (the blur's): ``(n * B, C, H + 2 margin, W + 2 margin)``."""
    rows, c, h, w = x.shape
    pad_h, pad_w = h // 2, w // 2
    padded_h, padded_w = h + 2 * pad_h, w + 2 * pad_w
    dtype, device = torch.float64, x.device
    # output pixel centres of the needed region, relative to the padded image's centre
    ys = torch.arange(pad_h - margin, pad_h + h + margin, dtype=dtype, device=device) + 0.5 - padded_h / 2
    xs = torch.arange(pad_w - margin, pad_w + w + margin, dtype=dtype, device=device) + 0.5 - padded_w / 2
    angle = params["angle"] * (math.pi / 180)
    cos, sin = (torch.cos(angle) / params["zoom"]).view(-1, 1, 1), (torch.sin(angle) / params["zoom"]).view(-1, 1, 1)
    dx = xs.view(1, 1, -1) - params["shift"][:, 0].view(-1, 1, 1)
    dy = ys.view(1, -1, 1) - params["shift"][:, 1].view(-1, 1, 1)
    # inverse map: the source point of each output pixel (rotation by -angle, zoom 1/s)
    src_x = cos * dx + sin * dy + padded_w / 2 - 0.5  # pixel index in the padded image
    src_y = -sin * dx + cos * dy + padded_h / 2 - 0.5
    coverage = _inside(src_x, padded_w) * _inside(src_y, padded_h)  # bilinear weight on the padded image
    if padding == "reflect":
        # the padded image mirrors the input about its border pixels (torch's "reflect"), which is
        # grid_sample's reflection with align_corners=True; beyond the padded image, its border
        # value (the zero fill's partial weight is ``coverage`` below)
        u = (src_x - pad_w).clamp(-pad_w, w - 1 + pad_w)
        v = (src_y - pad_h).clamp(-pad_h, h - 1 + pad_h)
        grid = torch.stack([2 * u / max(w - 1, 1) - 1, 2 * v / max(h - 1, 1) - 1], dim=-1)
        mode, corners = "reflection", True
    else:  # the padded image repeats the border pixels: the input's border value
        grid = torch.stack([(2 * (src_x - pad_w) + 1) / w - 1, (2 * (src_y - pad_h) + 1) / h - 1], dim=-1)
        mode, corners = "border", False
    b = rows // n
    grid = grid.to(x.dtype).repeat_interleave(b, dim=0)
    sampled = F.grid_sample(x, grid, mode="bilinear", padding_mode=mode, align_corners=corners)
    return sampled * (coverage.to(x.dtype) ** 2).repeat_interleave(b, dim=0).unsqueeze(1)


def _inside(position: torch.Tensor, size: int) -> torch.Tensor:
    """Total bilinear weight of the pixels ``0 .. size - 1`` at fractional ``position``."""
    return torch.minimum(position + 1, size - position).clamp(0, 1)


def _blur(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """5 x 5 Gaussian blur of ``(n, B, C, H + 4, W + 4)`` -> ``(n, B, C, H, W)``, one ``sigma`` per
    augmentation: two 1-D passes of the normalised kernel ``exp(-d^2 / (2 sigma^2))``, ``d = -2 .. 2``."""
    n, b, c, h, w = x.shape
    size = 2 * BLUR_RADIUS + 1
    offsets = torch.linspace(-BLUR_RADIUS, BLUR_RADIUS, size, device=x.device, dtype=x.dtype)
    pdf = torch.exp(-0.5 * (offsets.view(1, -1) / sigma.view(-1, 1).to(x)) ** 2)
    kernel = pdf / pdf.sum(1, keepdim=True)  # (n, 5)
    channels_last = x.reshape(n, b * c, h, w).transpose(0, 1)  # augmentations as conv channels
    out = F.conv2d(channels_last, kernel.view(n, 1, 1, size), groups=n)
    out = F.conv2d(out, kernel.view(n, 1, size, 1), groups=n)
    return out.transpose(0, 1).reshape(n, b, c, h - 2 * BLUR_RADIUS, w - 2 * BLUR_RADIUS)
