"""Common corruptions applied on the fly: the 15 of ImageNet-C plus two extras, severities 1-5.

Hendrycks & Dietterich, "Benchmarking Neural Network Robustness to Common Corruptions and
Perturbations", ICLR 2019 (https://arxiv.org/abs/1903.12261). Each corruption computes what the
authors' generators compute (hendrycks/robustness, ``ImageNet-C/create_c/make_*_c.py``), with
the constants of the generator chosen for the image size (``constants``, see
:mod:`clpeft.scenarios.corruption_constants`: CIFAR-10-C's up to 45 px, Tiny-ImageNet-C's up to
119 px, ImageNet-C's above), and truncates to ``uint8`` as they do (``np.uint8(...)``).

==========  ==========================================================================
noise       ``gaussian_noise``, ``shot_noise`` (Poisson), ``impulse_noise`` (salt and
            pepper per value), ``speckle_noise`` (extra)
blur        ``defocus_blur``, ``glass_blur``, ``motion_blur``, ``zoom_blur``,
            ``gaussian_blur`` (extra)
weather     ``snow``, ``frost``, ``fog`` (diamond-square plasma fractal), ``brightness``
digital     ``contrast``, ``elastic_transform``, ``pixelate``, ``jpeg_compression``
==========  ==========================================================================

**Determinism.** Image ``i`` draws from its own ``np.random.RandomState(sample_seed(seed,
corruption, severity, i))``, with the reference's numpy calls in the reference's order (the
reference draws them from numpy's global state): a sample gets the same corruption in any batch,
in any order, in every run with that seed, and seeding numpy's global state with
:func:`sample_seed` before calling the reference reproduces it.

**Where clpeft follows another implementation than the reference's** (what the tests in
``tests/reference/test_corruptions.py`` compare, and to what tolerance, is stated there):

* ``motion_blur`` and ``snow``'s streaks: the reference calls ImageMagick's
  ``MagickMotionBlurImage`` through Wand; clpeft computes ImageMagick's kernel as the
  ``imagecorruptions`` package rebuilds it in numpy (one-sided Gaussian taps along a line) and
  rounds to ``uint8`` as ImageMagick's 8-bit output does (``imagecorruptions`` truncates).
* ``impulse_noise``: scikit-image 0.14's ``random_noise(mode='s&p')``, which drew two
  ``np.random.choice`` masks from numpy's global state (scikit-image 0.19 and later draw from a
  ``Generator``).
* ``elastic_transform``'s affine warp: OpenCV 5's ``warpAffine`` (float coordinates; OpenCV 3,
  which made the published files, rounded them to 1/32 pixel).
* ``frost``: the photographs ship in ``clpeft/scenarios/frost/`` (Apache-2.0, see its NOTICE);
  an image larger than the shrunk photograph (only at sizes a reference never made) crops from
  the photograph enlarged to 1.1 times the image, as ``imagecorruptions`` does.
* The saved files: CIFAR-10-C's ``.npy`` hold the generator's output as is, but the published
  Tiny-ImageNet-C and ImageNet-C images were saved as JPEG (quality 85) after corrupting; on the
  fly there is no such re-encoding (read the published files with ``corrupted_root`` for that).
* Images that are not RGB: ``brightness`` adds to the value (``imagecorruptions``), ``snow``
  takes the image as its own grey level, ``frost`` blends the photograph's luminance (0.2989,
  0.587, 0.114); the other corruptions treat every channel alike.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable
from functools import cache
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from clpeft.scenarios import corruption_ops as ops
from clpeft.scenarios.corruption_constants import CONSTANTS, ELASTIC_SIZE_FACTOR, FROST_SCALE, ConstantChoice, constant_set

#: The 15 corruptions of ImageNet-C / CIFAR-10-C in the order of the continual TTA benchmarks
#: (Wang et al., CoTTA, CVPR 2022; ``CORRUPTION.TYPE`` of mariodoebler/test-time-adaptation).
IMAGENET_C = [
    "gaussian_noise",
    "shot_noise",
    "impulse_noise",
    "defocus_blur",
    "glass_blur",
    "motion_blur",
    "zoom_blur",
    "snow",
    "frost",
    "fog",
    "brightness",
    "contrast",
    "elastic_transform",
    "pixelate",
    "jpeg_compression",
]

FROST_DIR = Path(__file__).resolve().parent / "frost"
#: The photographs ``np.random.randint(5)`` picks from (the reference lists a sixth it never draws).
FROST_PHOTOS = ["frost1", "frost2", "frost3", "frost4", "frost5"]
_FROST_SUFFIX = {"frost1": ".png", "frost2": ".png", "frost3": ".png", "frost4": ".jpg", "frost5": ".jpg"}

States = list[np.random.RandomState]


def _to_255(x: np.ndarray) -> np.ndarray:
    """``np.clip(x, 0, 1) * 255``, the reference's last step before ``np.uint8``."""
    return np.clip(x, 0, 1) * 255


# ----------------------------------------------------------------------------- noise


def gaussian_noise(u, c, states, constants):
    x = u / 255.0
    return _to_255(x + np.stack([s.normal(size=x.shape[1:], scale=c) for s in states]))


def shot_noise(u, c, states, constants):
    x = u / 255.0
    return _to_255(np.stack([s.poisson(xi * c) for xi, s in zip(x, states)]) / float(c))


def impulse_noise(u, c, states, constants):
    """scikit-image 0.14's ``random_noise(x, mode='s&p', amount=c)``: a value flips with
    probability ``c``, to 1 or 0 with equal odds (two ``np.random.choice`` draws, in this order)."""
    x = u / 255.0
    for xi, s in zip(x, states):
        flipped = s.choice([True, False], size=xi.shape, p=[c, 1 - c])
        salted = s.choice([True, False], size=xi.shape, p=[0.5, 0.5])
        xi[flipped & salted] = 1
        xi[flipped & ~salted] = 0
    return _to_255(x)


def speckle_noise(u, c, states, constants):
    x = u / 255.0
    return _to_255(x + x * np.stack([s.normal(size=x.shape[1:], scale=c) for s in states]))


# ----------------------------------------------------------------------------- blur


def gaussian_blur(u, c, states, constants):
    return _to_255(ops.gaussian_filter(u / 255.0, c))


def defocus_blur(u, c, states, constants):
    radius, alias_blur = c
    return _to_255(ops.filter2d(u / 255.0, ops.disk_kernel(radius, alias_blur)))


def glass_blur(u, c, states, constants):
    """Blur, move pixels locally, blur (sigma, max_delta, iterations = ``c``).

    The reference's "swap" ``x[h, w], x[h', w'] = x[h', w'], x[h, w]`` does not swap: numpy
    evaluates the right side to two *views*, writes the first into ``x[h, w]``, and then writes
    ``x[h, w]``'s new value, ``x[h', w']``'s own, back into ``x[h', w']``. Each step therefore
    *copies* pixel ``(h + dy, w + dx)`` into ``(h, w)``, and later steps read the copies. clpeft
    does exactly that, over the rows ``H - delta .. delta + 1`` and columns ``W - delta .. delta + 1``
    from the bottom right, one ``randint(-delta, delta, size=2)`` = ``(dx, dy)`` per pixel: a row
    at a time (reads of other rows see their current values; reads further right in the same row,
    already overwritten, follow the chain of copies by pointer jumping).
    """
    sigma, delta, iterations = c
    x = (ops.gaussian_filter(u / 255.0, sigma) * 255).astype(np.uint8)
    n, h, w, _ = x.shape
    rows, cols = np.arange(h - delta, delta, -1), np.arange(w - delta, delta, -1)
    draws = np.stack([s.randint(-delta, delta, size=(iterations * len(rows), len(cols), 2)) for s in states])
    source = np.tile(np.arange(h * w).reshape(h, w), (n, 1, 1))  # which original pixel each pixel now holds
    batch, position = np.arange(n)[:, None], np.arange(len(cols))
    for step in range(iterations * len(rows)):
        row = rows[step % len(rows)]
        dx, dy = draws[:, step, :, 0], draws[:, step, :, 1]
        read_col = cols + dx
        moved = source[batch, row + dy, read_col]
        written = (dy == 0) & (dx > 0) & (read_col <= w - delta)  # reads a pixel of this row already copied into
        pointer = np.where(written, (w - delta) - read_col, position)
        for _ in range(max(1, len(cols)).bit_length()):
            pointer = np.take_along_axis(pointer, pointer, axis=1)
        source[:, row, cols] = np.take_along_axis(moved, pointer, axis=1)
    moved = np.take_along_axis(x.reshape(n, h * w, -1), source.reshape(n, h * w, 1), axis=1).reshape(x.shape)
    return _to_255(ops.gaussian_filter(moved / 255.0, sigma))


def motion_blur(u, c, states, constants):
    radius, sigma = c
    angles = np.array([s.uniform(-45, 45) for s in states])
    return np.floor(np.clip(ops.motion_blur(u, radius, sigma, angles), 0, 255) + 0.5)


def zoom_blur(u, c, states, constants):
    x = (u / 255.0).astype(np.float32)
    factors = np.arange(*c)
    out = np.zeros_like(x)
    for factor in factors:
        out += ops.clipped_zoom(x, factor)
    return _to_255((x + out) / (len(factors) + 1))


# ----------------------------------------------------------------------------- weather


def _grey(x: np.ndarray) -> np.ndarray:
    """OpenCV's ``cvtColor(x, COLOR_RGB2GRAY)`` of float32 RGB images (the image itself if grey)."""
    if x.shape[-1] != 3:
        return x.mean(axis=-1, keepdims=True, dtype=np.float32)
    return (x[..., 0:1] * np.float32(0.299) + x[..., 1:2] * np.float32(0.587)) + x[..., 2:3] * np.float32(0.114)


def snow(u, c, states, constants):
    loc, scale, zoom, threshold, radius, sigma, mix = c
    n, h, w, _ = u.shape
    x = u.astype(np.float32) / 255.0
    layer = ops.clipped_zoom(np.stack([s.normal(size=(h, w), loc=loc, scale=scale) for s in states])[..., None], zoom)
    layer[layer < threshold] = 0
    layer = (np.clip(layer, 0, 1) * 255).astype(np.uint8)  # the reference's greyscale PNG for ImageMagick
    angles = np.array([s.uniform(-135, -45) for s in states])
    layer = np.floor(np.clip(ops.motion_blur(layer, radius, sigma, angles), 0, 255) + 0.5) / 255.0
    x = mix * x + (1 - mix) * np.maximum(x, _grey(x) * 1.5 + 0.5)
    return _to_255(x + layer + layer[:, ::-1, ::-1])


@cache
def frost_photo(name: str, scale: str | None) -> np.ndarray:
    """A frost photograph as the reference reads it, ``uint8`` RGB ``(H, W, 3)``: the original, or
    shrunk by OpenCV by 0.2 (``scale="020"``) or 0.3 (``"030"``), shipped as PNG (see NOTICE)."""
    path = FROST_DIR / (f"{name}_scale{scale}.png" if scale else name + _FROST_SUFFIX[name])
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def _frost_crop(photo: np.ndarray, h: int, w: int, state: np.random.RandomState) -> np.ndarray:
    if photo.shape[0] <= h or photo.shape[1] <= w:  # an image larger than any a reference made
        factor = 1.1 * max(h / photo.shape[0], w / photo.shape[1], 1.0)
        size = (int(np.ceil(photo.shape[1] * factor)), int(np.ceil(photo.shape[0] * factor)))
        photo = np.asarray(Image.fromarray(photo).resize(size, Image.BICUBIC))
    top, left = state.randint(0, photo.shape[0] - h), state.randint(0, photo.shape[1] - w)
    return photo[top : top + h, left : left + w]


def frost(u, c, states, constants):
    """``c[0] x + c[1] frost``: a random crop of one of five frost photographs (drawn as the
    reference draws them: the photograph, then the top row, then the left column)."""
    n, h, w, channels = u.shape
    crops = []
    for s in states:
        photo = frost_photo(FROST_PHOTOS[s.randint(5)], FROST_SCALE[constants])
        crops.append(_frost_crop(photo, h, w, s))
    layer = np.stack(crops)
    if channels != 3:
        layer = np.dot(layer, [0.2989, 0.5870, 0.1140])[..., None]
    return np.clip(c[0] * u + c[1] * layer, 0, 255)


def fog(u, c, states, constants):
    strength, decay = c
    n, h, w, _ = u.shape
    x = u / 255.0
    peak = x.max(axis=(1, 2, 3), keepdims=True)
    mapsize = 1 << (max(h, w) - 1).bit_length()
    x = x + strength * np.stack([ops.plasma_fractal(s, mapsize, decay)[:h, :w] for s in states])[..., None]
    return _to_255(x * peak / (peak + strength))


def brightness(u, c, states, constants):
    x = u / 255.0
    if x.shape[-1] != 3:
        return _to_255(x + c)
    hsv = ops.rgb_to_hsv(x)
    hsv[..., 2] = np.clip(hsv[..., 2] + c, 0, 1)
    return _to_255(ops.hsv_to_rgb(hsv))


# ----------------------------------------------------------------------------- digital


def contrast(u, c, states, constants):
    x = u / 255.0
    means = np.stack([xi.mean(axis=(0, 1), keepdims=True) for xi in x])  # numpy's own summation order
    return _to_255((x - means) * c + means)


def elastic_transform(u, c, states, constants):
    """A random affine warp, then a smoothed random displacement field (Simard et al. 2003)."""
    n, h, w, _ = u.shape
    numerator, denominator = ELASTIC_SIZE_FACTOR[constants]
    size = max(h, w) * numerator / denominator
    alpha, sigma, shift = (size * k for k in c)
    x = u.astype(np.float32) / 255.0
    centre = np.float32((h, w)) // 2
    square = min(h, w) // 3
    src = np.float32([centre + square, [centre[0] + square, centre[1] - square], centre - square])
    maps, fields = [], []
    for s in states:
        maps.append(ops.affine_from_points(src, src + s.uniform(-shift, shift, size=src.shape).astype(np.float32)))
        fields.append([s.uniform(-1, 1, size=(h, w)), s.uniform(-1, 1, size=(h, w))])
    x = ops.warp_affine(x, np.stack(maps))
    fields = np.array(fields)  # (N, 2, H, W): dx, dy
    fields = ops.gaussian_filter(fields.transpose(0, 2, 3, 1), sigma, mode="reflect", truncate=3) * alpha
    fields = fields.astype(np.float32)
    rows = np.arange(h)[None, :, None] + fields[..., 1]
    cols = np.arange(w)[None, None, :] + fields[..., 0]
    return _to_255(ops.sample_linear(x, rows, cols))


def _pil_images(u: np.ndarray):
    """Each image as PIL images: one RGB image, or one ``L`` image per channel."""
    for image in u:
        yield [Image.fromarray(image)] if image.shape[-1] == 3 else [Image.fromarray(ch) for ch in image.transpose(2, 0, 1)]


def _from_pil(parts: list) -> np.ndarray:
    arrays = [np.asarray(p) for p in parts]
    return arrays[0] if arrays[0].ndim == 3 else np.stack(arrays, axis=-1)


def pixelate(u, c, states, constants):
    """PIL's BOX shrink to ``int(side * c)`` and BOX enlarge back."""
    n, h, w, _ = u.shape
    return np.stack(
        [_from_pil([p.resize((int(w * c), int(h * c)), Image.BOX).resize((w, h), Image.BOX) for p in parts]) for parts in _pil_images(u)]
    )


def jpeg_compression(u, c, states, constants):
    """PIL's JPEG round trip at quality ``c``."""

    def round_trip(image):
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=c)
        return Image.open(buffer)

    return np.stack([_from_pil([round_trip(p) for p in parts]) for parts in _pil_images(u)])


Corruption = Callable[[np.ndarray, object, States, str], np.ndarray]

CORRUPTIONS: dict[str, Corruption] = {
    f.__name__: f
    for f in (
        gaussian_noise,
        shot_noise,
        impulse_noise,
        speckle_noise,
        defocus_blur,
        glass_blur,
        motion_blur,
        zoom_blur,
        gaussian_blur,
        snow,
        frost,
        fog,
        brightness,
        contrast,
        elastic_transform,
        pixelate,
        jpeg_compression,
    )
}


# ----------------------------------------------------------------------------- public API


def sample_seed(seed: int, name: str, severity: int, index: int) -> list[int]:
    """The seed (two 32-bit words) of sample ``index``'s ``np.random.RandomState``."""
    digest = hashlib.sha256(repr((seed, name, severity, int(index))).encode()).digest()
    return [int.from_bytes(digest[:4], "little"), int.from_bytes(digest[4:8], "little")]


def corrupt(images: torch.Tensor, name: str, severity: int, seed: int, indices, constants: ConstantChoice = "auto") -> torch.Tensor:
    """``uint8`` images ``(N, C, H, W)`` (or ``(N, H, W)``) corrupted as sample ``indices[n]``.

    Args:
        images: the clean images.
        name: a key of :data:`CORRUPTIONS`.
        severity: 1 (mild) to 5 (severe).
        seed: with ``name``, ``severity`` and the index, seeds each sample's random draws.
        indices: the dataset index of every image (the draws are a function of it).
        constants: ``cifar``, ``tinyimagenet``, ``imagenet``, or ``auto`` (by the image size, see
            :func:`~clpeft.scenarios.corruption_constants.constant_set`).
    """
    if name not in CORRUPTIONS:
        raise KeyError(f"unknown corruption '{name}'; known: {', '.join(CORRUPTIONS)}")
    if not 1 <= severity <= 5:
        raise ValueError(f"severity must be 1..5, got {severity}")
    if len(images) == 0:
        return images
    flat = images.dim() == 3
    x = (images.unsqueeze(1) if flat else images).permute(0, 2, 3, 1).contiguous().numpy()
    chosen = constant_set(constants, x.shape[1], x.shape[2])
    states = [np.random.RandomState(sample_seed(seed, name, severity, i)) for i in torch.as_tensor(indices).tolist()]
    out = CORRUPTIONS[name](x, CONSTANTS[chosen][name][severity - 1], states, chosen)
    out = torch.from_numpy(np.asarray(out).astype(np.uint8)).permute(0, 3, 1, 2).contiguous()
    return out.squeeze(1) if flat else out


def gather(dataset, indices: torch.Tensor):
    """``(inputs, labels)`` of ``dataset`` at ``indices``: its own ``gather`` when it has one (an
    :class:`~clpeft.data.ArrayDataset`), else its items stacked (images decoded from files)."""
    if hasattr(dataset, "gather"):
        return dataset.gather(indices)
    items = [dataset[int(i)] for i in indices]
    return torch.stack([torch.as_tensor(x) for x, _ in items]), dataset.targets.index_select(0, indices)


class TransformedDataset(torch.utils.data.Dataset):
    """A dataset of images seen through a batched transform, applied on the fly.

    Batches go through :meth:`gather`: one vectorised ``transform(images, indices)`` per batch
    (``indices`` lets a transform seed per-sample draws); the labels are the wrapped dataset's.
    Any dataset of ``uint8`` images works (see :func:`gather`).

    Args:
        base: the clean images (``uint8`` ``(N, C, H, W)``).
        transform: ``(images, indices) -> images``.
        name: shown in logs, appended to the base dataset's name.
        key: everything that determines the transform (the feature-cache fingerprint); ``name``
            when not given.
    """

    def __init__(self, base, transform: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], name: str, key: str | None = None):
        self.base = base
        self.transform = transform
        self.name = f"{base.name}|{name}"
        self.key = key or name
        self.class_names = getattr(base, "class_names", None)

    @property
    def targets(self) -> torch.Tensor:
        return self.base.targets

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        x, y = self.gather(torch.tensor([i]))
        return x[0], y[0]

    def gather(self, indices: torch.Tensor):
        x, y = gather(self.base, indices)
        return self.transform(x, indices), y

    @property
    def fingerprint(self) -> str:
        return hashlib.sha1(f"{self.base.fingerprint}|{self.key}".encode()).hexdigest()[:16]


class CorruptedDataset(TransformedDataset):
    """A dataset of images seen through one corruption at one severity, applied on the fly.

    Args:
        base: the clean images (``uint8`` ``(N, C, H, W)``).
        corruption: a key of :data:`CORRUPTIONS`.
        severity: 1..5.
        seed: seeds the per-sample draws (see :func:`corrupt`).
        constants: whose constants (see :func:`corrupt`).
    """

    def __init__(self, base, corruption: str, severity: int, seed: int, constants: ConstantChoice = "auto"):
        if corruption not in CORRUPTIONS:
            raise KeyError(f"unknown corruption '{corruption}'")
        self.corruption = corruption
        self.severity = severity
        self.seed = seed
        self.constants = constants
        # "robustness": the reference-equal implementation; features cached from an earlier one are not reused
        super().__init__(
            base,
            lambda x, indices: corrupt(x, corruption, severity, seed, indices, constants),
            f"{corruption}@{severity}",
            key=f"{corruption}|{severity}|{seed}|{constants}|robustness",
        )
