"""The image operations the corruptions are built from, batched over ``(N, H, W, C)`` numpy arrays.

Each one computes what the library the reference generators call computes (scikit-image, SciPy,
OpenCV, ImageMagick), in the same floating-point order where that is cheap, so that the
corruptions of :mod:`clpeft.scenarios.corruptions` truncate to the same ``uint8`` levels as the
reference's (see ``tests/reference/test_corruptions.py`` for what is bit-equal and what is equal
to one level).
"""

from __future__ import annotations

import math

import numpy as np
import scipy.ndimage as ndi
from scipy.fft import next_fast_len


def gaussian_filter(x: np.ndarray, sigma: float, mode: str = "nearest", truncate: float = 4.0) -> np.ndarray:
    """scikit-image's ``gaussian(..., multichannel=True)`` of every image: SciPy's Gaussian along
    H then W (the batch and channel axes untouched, so each image is filtered exactly alone)."""
    sigmas = (0, sigma, sigma, 0)[: x.ndim]
    return ndi.gaussian_filter(x, sigmas, mode=mode, truncate=truncate)


def _linear_weights(t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """SciPy's order-1 spline weights at offset ``t``: the last is one minus the others."""
    w0 = 1.0 - t
    return w0, 1.0 - w0


def zoom_linear(x: np.ndarray, factor: float) -> np.ndarray:
    """``scipy.ndimage.zoom(image, (factor, factor, 1), order=1)`` of every image of ``x``
    ``(N, h, w, C)``, in SciPy's order of operations (bit-equal, checked in the tests)."""
    n, h, w, c = x.shape
    out_h, out_w = int(round(h * factor)), int(round(w * factor))

    def axis(n_in: int, n_out: int):
        ratio = (n_in - 1) / (n_out - 1) if n_out > 1 else 1.0
        coords = np.arange(n_out) * ratio
        start = np.floor(coords)
        w0, w1 = _linear_weights(coords - start)
        start = start.astype(np.int64)
        return [(np.minimum(start, n_in - 1), w0), (np.minimum(start + 1, n_in - 1), w1)]

    v = x.astype(np.float64, copy=False)
    out = np.zeros((n, out_h, out_w, c))
    for rows, wr in axis(h, out_h):
        weighted_rows = v.take(rows, axis=1) * wr[None, :, None, None]  # (value * row weight) * column weight
        for cols, wc in axis(w, out_w):
            out += weighted_rows.take(cols, axis=2) * wc[None, None, :, None]
    return out.astype(x.dtype)


def clipped_zoom(x: np.ndarray, factor: float) -> np.ndarray:
    """The reference's ``clipped_zoom``: zoom into the centre ``ceil(side / factor)`` crop, then
    cut the central ``H x W`` (per axis, for non-square images)."""
    _, h, w, _ = x.shape
    ch, cw = int(np.ceil(h / float(factor))), int(np.ceil(w / float(factor)))
    top, left = (h - ch) // 2, (w - cw) // 2
    zoomed = zoom_linear(x[:, top : top + ch, left : left + cw], factor)
    trim_top, trim_left = (zoomed.shape[1] - h) // 2, (zoomed.shape[2] - w) // 2
    return zoomed[:, trim_top : trim_top + h, trim_left : trim_left + w]


def _reflect_index(i: np.ndarray, n: int) -> np.ndarray:
    """SciPy's ``reflect`` border (``d c b a | a b c d | d c b a``) for integer indices."""
    i = np.mod(i, 2 * n)
    return np.where(i >= n, 2 * n - 1 - i, i)


def _reflect101_index(i: np.ndarray, n: int) -> np.ndarray:
    """OpenCV's ``BORDER_REFLECT_101`` (``d c b | a b c d | c b a``) for integer indices."""
    if n == 1:
        return np.zeros_like(i)
    i = np.mod(i, 2 * n - 2)
    return np.where(i >= n, 2 * n - 2 - i, i)


def sample_linear(x: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """``scipy.ndimage.map_coordinates(image, (rows, cols, channel), order=1, mode='reflect')``
    for every image of ``x`` ``(N, H, W, C)`` at ``rows``, ``cols`` ``(N, H, W)``, in SciPy's
    order of operations; the result has ``x``'s dtype."""
    n, h, w, _ = x.shape
    r0, c0 = np.floor(rows), np.floor(cols)
    wr, wc = _linear_weights(rows - r0), _linear_weights(cols - c0)
    r0, c0 = r0.astype(np.int64), c0.astype(np.int64)
    batch = np.arange(n)[:, None, None]
    out = np.zeros(x.shape)
    for a in range(2):
        ri = _reflect_index(r0 + a, h)
        for b in range(2):
            ci = _reflect_index(c0 + b, w)
            out += (x[batch, ri, ci].astype(np.float64) * wr[a][..., None]) * wc[b][..., None]
    return out.astype(x.dtype)


def affine_from_points(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """OpenCV's ``getAffineTransform``: the ``(2, 3)`` map taking the 3 ``src`` points to ``dst``."""
    return np.linalg.solve(np.c_[src.astype(np.float64), np.ones(3)], dst.astype(np.float64)).T


def warp_affine(x: np.ndarray, maps: np.ndarray) -> np.ndarray:
    """OpenCV's ``warpAffine(image, M, (W, H), borderMode=BORDER_REFLECT_101)`` (bilinear) of
    every ``float32`` image of ``x`` ``(N, H, W, C)`` with its own ``maps[n]`` ``(2, 3)``.

    As OpenCV 5 does, each output pixel ``p`` reads the input at ``M^-1 p`` in float32
    coordinates and interpolates in float32 (OpenCV 3, which made the published files, rounded
    the coordinates to 1/32 pixel first); equal to OpenCV up to float rounding.
    """
    n, h, w, _ = x.shape
    inverse = np.linalg.inv(np.concatenate([maps, np.tile([[[0.0, 0.0, 1.0]]], (n, 1, 1))], axis=1))[:, :2]
    inverse = inverse.astype(np.float32)
    ys, xs = np.meshgrid(np.arange(h, dtype=np.float32), np.arange(w, dtype=np.float32), indexing="ij")
    src_x = inverse[:, None, None, 0, 1] * ys + inverse[:, None, None, 0, 2] + inverse[:, None, None, 0, 0] * xs
    src_y = inverse[:, None, None, 1, 1] * ys + inverse[:, None, None, 1, 2] + inverse[:, None, None, 1, 0] * xs
    sx, sy = np.floor(src_x), np.floor(src_y)
    fx, fy = (src_x - sx)[..., None], (src_y - sy)[..., None]
    sx, sy = sx.astype(np.int64), sy.astype(np.int64)
    batch = np.arange(n)[:, None, None]

    def at(dy: int, dx: int) -> np.ndarray:
        return x[batch, _reflect101_index(sy + dy, h), _reflect101_index(sx + dx, w)]

    top = at(0, 0) + fx * (at(0, 1) - at(0, 0))
    bottom = at(1, 0) + fx * (at(1, 1) - at(1, 0))
    return top + fy * (bottom - top)


def motion_blur(x: np.ndarray, radius: float, sigma: float, angles: np.ndarray) -> np.ndarray:
    """ImageMagick's ``MotionBlurImage(radius, sigma, angle)`` of every image of ``x`` ``(N, H, W, C)``
    at its own ``angles[n]`` (degrees), as ``imagecorruptions``' numpy rebuild computes it.

    ``2 radius + 1`` taps ``i`` with weights ``exp(-i^2 / (2 sigma^2))`` (normalised); tap ``i``
    reads the pixel ``ceil(i sin a - 0.5)`` rows and ``ceil(i cos a - 0.5)`` columns away, borders
    replicated; taps stop at the first one that leaves the image. Float64, unrounded.
    """
    n, h, w, _ = x.shape
    width = int(radius * 2 + 1)
    taps = np.arange(width)
    kernel = np.exp(-(taps**2) / (2 * sigma**2)) / (np.sqrt(2 * np.pi) * sigma)
    kernel = kernel / np.sum(kernel)
    padded = np.pad(x, ((0, 0), (width, width), (width, width), (0, 0)), mode="edge")
    out = np.empty(x.shape)
    for k, angle in enumerate(angles):
        point_y, point_x = width * np.sin(np.deg2rad(angle)), width * np.cos(np.deg2rad(angle))
        hypot = math.hypot(point_y, point_x)
        blurred = np.zeros(x.shape[1:], dtype=np.float32)
        for i in range(width):
            dy, dx = -math.ceil(i * point_y / hypot - 0.5), -math.ceil(i * point_x / hypot - 0.5)
            if abs(dy) >= h or abs(dx) >= w:
                break
            blurred = blurred + kernel[i] * padded[k, width - dy : width - dy + h, width - dx : width - dx + w]
        out[k] = blurred
    return out


def plasma_fractal(state: np.random.RandomState, mapsize: int, decay: float) -> np.ndarray:
    """A diamond-square height map ``(mapsize, mapsize)`` in [0, 1] (the reference's fog, after
    FLHerne/mapgen), drawing ``uniform(-wibble, wibble)`` per filled point from ``state``."""
    height = np.empty((mapsize, mapsize))
    height[0, 0] = 0
    step, wibble = mapsize, 100.0

    def wibbled(mean4: np.ndarray) -> np.ndarray:
        return mean4 / 4 + wibble * state.uniform(-wibble, wibble, mean4.shape)

    while step >= 2:
        half = step // 2
        corners = height[0:mapsize:step, 0:mapsize:step]
        square = corners + np.roll(corners, -1, axis=0)
        square += np.roll(square, -1, axis=1)
        height[half:mapsize:step, half:mapsize:step] = wibbled(square)
        centres = height[half:mapsize:step, half:mapsize:step]
        corners = height[0:mapsize:step, 0:mapsize:step]
        height[0:mapsize:step, half:mapsize:step] = wibbled(
            (centres + np.roll(centres, 1, axis=0)) + (corners + np.roll(corners, -1, axis=1))
        )
        height[half:mapsize:step, 0:mapsize:step] = wibbled(
            (centres + np.roll(centres, 1, axis=1)) + (corners + np.roll(corners, -1, axis=0))
        )
        step //= 2
        wibble /= decay
    height -= height.min()
    return height / height.max()


def rgb_to_hsv(rgb: np.ndarray) -> np.ndarray:
    """scikit-image's ``rgb2hsv`` (same operations; ties go to blue, then green, then red)."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    value = np.maximum(np.maximum(r, g), b)  # rgb.max(-1) and np.ptp(rgb, -1), without slow 3-wide reductions
    delta = value - np.minimum(np.minimum(r, g), b)
    with np.errstate(invalid="ignore", divide="ignore"):
        saturation = np.where(delta == 0, 0.0, delta / value)
        hue = np.zeros_like(value)
        for k, offset in ((0, 0.0), (1, 2.0), (2, 4.0)):
            mask = rgb[..., k] == value
            diff = rgb[..., (k + 1) % 3] - rgb[..., (k + 2) % 3]
            hue = np.where(mask, (offset + diff / delta) if k else diff / delta, hue)
        hue = np.where(delta == 0, 0.0, (hue / 6.0) % 1.0)
    return np.nan_to_num(np.stack([hue, saturation, value], axis=-1), nan=0.0)


def hsv_to_rgb(hsv: np.ndarray) -> np.ndarray:
    """scikit-image's ``hsv2rgb`` (same operations; each channel picked by the hue's sextant)."""
    h, s, v = hsv[..., 0], hsv[..., 1], hsv[..., 2]
    sector = np.floor(h * 6)
    f = h * 6 - sector
    p = v * (1 - s)
    q = v * (1 - f * s)
    t = v * (1 - (1 - f) * s)
    sector = sector.astype(np.uint8) % 6
    return np.stack(
        [np.choose(sector, (v, q, p, p, t, v)), np.choose(sector, (t, v, v, q, p, p)), np.choose(sector, (p, p, t, v, v, q))], axis=-1
    )


def disk_kernel(radius: float, alias_blur: float) -> np.ndarray:
    """The reference's ``disk``: a normalised float32 disk on a 17x17 grid (``2 radius + 1``
    above radius 8), smoothed by OpenCV's 3x3 (5x5) Gaussian with sigma ``alias_blur``."""
    span = np.arange(-8, 9) if radius <= 8 else np.arange(-radius, radius + 1)
    ksize = 3 if radius <= 8 else 5
    yy, xx = np.meshgrid(span, span, indexing="ij")
    disk = np.array((xx**2 + yy**2) <= radius**2, dtype=np.float32)
    disk /= np.sum(disk)
    t = np.arange(ksize) - (ksize - 1) * 0.5
    g = np.exp(-0.5 / (alias_blur * alias_blur) * t * t)
    g = (g / g.sum()).astype(np.float32)
    pad = ksize // 2
    padded = np.pad(disk, pad, mode="reflect")  # BORDER_REFLECT_101
    rows = sum(g[k] * padded[:, k : k + disk.shape[1]] for k in range(ksize))
    return sum(g[k] * rows[k : k + disk.shape[0], :] for k in range(ksize)).astype(np.float32)


def filter2d(x: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    """OpenCV's ``filter2D(channel, -1, kernel)`` (correlation, ``BORDER_REFLECT_101``) of every
    channel of every image of float64 ``x`` ``(N, H, W, C)``, through the FFT as OpenCV does for
    kernels of 50 taps and more; equal to OpenCV up to float rounding."""
    import torch

    n, h, w, c = x.shape
    kh, kw = kernel.shape
    ph, pw = kh // 2, kw // 2
    # (indices rather than torch's reflect pad, which refuses pads as wide as the image: a
    # 17-tap kernel on 8 px digits reflects more than once, as OpenCV's borderInterpolate does)
    rows = _reflect101_index(np.arange(-ph, h + ph), h)
    cols = _reflect101_index(np.arange(-pw, w + pw), w)
    padded = torch.from_numpy(np.ascontiguousarray(x[:, rows][:, :, cols].transpose(0, 3, 1, 2)))
    size = (next_fast_len(padded.shape[-2], real=True), next_fast_len(padded.shape[-1], real=True))
    # (zero-padded to a fast FFT size: the kept window never wraps around)
    flipped = torch.from_numpy(kernel[::-1, ::-1].astype(np.float64).copy())
    product = torch.fft.rfft2(padded, s=size) * torch.fft.rfft2(flipped, s=size)
    full = torch.fft.irfft2(product, s=size)
    out = full[..., kh - 1 : kh - 1 + h, kw - 1 : kw - 1 + w]
    return out.permute(0, 2, 3, 1).numpy()
