"""Corruptions: deterministic per sample and seed, graded by severity, with each resolution's constants.

Equality with the reference generators (hendrycks/robustness) is tested in
``tests/reference/test_corruptions.py``; these tests need no reference code.
"""

from __future__ import annotations

import colorsys
import io

import numpy as np
import pytest
import scipy.ndimage as ndi
import torch
import torch.nn.functional as F
from PIL import Image

from clpeft.data import ArrayDataset
from clpeft.scenarios import corruption_ops as ops
from clpeft.scenarios import corruptions as C
from clpeft.scenarios.corruption_constants import CONSTANTS, constant_set
from clpeft.scenarios.datasets import load_dataset

RANDOM = [
    "gaussian_noise",
    "shot_noise",
    "impulse_noise",
    "speckle_noise",
    "glass_blur",
    "motion_blur",
    "snow",
    "frost",
    "fog",
    "elastic_transform",
]
# The reference's constants grow with severity for these (glass blur and elastic transform do not
# give a monotone distortion in the reference either).
MONOTONE = [
    "gaussian_noise",
    "shot_noise",
    "impulse_noise",
    "speckle_noise",
    "defocus_blur",
    "motion_blur",
    "zoom_blur",
    "gaussian_blur",
    "fog",
    "brightness",
    "contrast",
    "pixelate",
    "jpeg_compression",
]


@pytest.fixture(scope="module")
def images():
    """12 sklearn digits upsampled to 32x32 (CIFAR-sized), grey and RGB."""
    _, test = load_dataset("sklearn_digits", "~/.cache/clpeft/data")
    grey = F.interpolate(test.inputs[:12].float(), size=32, mode="bilinear").round().to(torch.uint8)
    rgb = torch.cat([grey, (grey.float() * 0.6).to(torch.uint8), 255 - grey], dim=1)
    return {"grey": grey, "rgb": rgb, "labels": test.targets[:12]}


def test_all_15_imagenet_c_corruptions_are_there():
    assert set(C.IMAGENET_C) <= set(C.CORRUPTIONS) and len(C.IMAGENET_C) == 15


@pytest.mark.parametrize("name", list(C.CORRUPTIONS))
def test_each_sample_is_corrupted_the_same_in_any_batch(images, name):
    x, idx = images["rgb"], torch.arange(100, 112)
    full = C.corrupt(x, name, 3, seed=7, indices=idx)
    assert full.dtype == torch.uint8 and full.shape == x.shape
    assert torch.equal(full, C.corrupt(x, name, 3, seed=7, indices=idx))
    order = torch.tensor([5, 2, 9])
    assert torch.equal(full[order], C.corrupt(x[order], name, 3, seed=7, indices=idx[order]))
    assert not torch.equal(full, C.corrupt(x, name, 5, seed=7, indices=idx))  # severity matters
    assert not torch.equal(full, x)
    other_seed = C.corrupt(x, name, 3, seed=8, indices=idx)
    assert torch.equal(full, other_seed) != (name in RANDOM)  # only random corruptions depend on the seed


@pytest.mark.parametrize("name", list(C.CORRUPTIONS))
def test_grey_images_stay_grey(images, name):
    out = C.corrupt(images["grey"][:3], name, 4, 0, torch.arange(3))
    assert out.shape == images["grey"][:3].shape and out.dtype == torch.uint8


@pytest.mark.parametrize("channels", ["grey", "rgb"])
def test_distortion_grows_with_severity(images, channels):
    x = images[channels]
    for name in MONOTONE:
        mse = [((C.corrupt(x, name, s, 0, torch.arange(12)).float() - x.float()) ** 2).mean().item() for s in range(1, 6)]
        assert all(a < b for a, b in zip(mse, mse[1:])), (name, mse)


@pytest.mark.parametrize(
    "side,expected",
    [
        (28, "cifar"),
        (32, "cifar"),
        (45, "cifar"),
        (46, "tinyimagenet"),
        (64, "tinyimagenet"),
        (98, "tinyimagenet"),
        (112, "tinyimagenet"),
        (119, "tinyimagenet"),
        (120, "imagenet"),
        (224, "imagenet"),
        (384, "imagenet"),
    ],
)
def test_auto_takes_the_constants_of_the_nearest_native_size(side, expected):
    """Mutation checked: deciding by the shorter side fails."""
    assert constant_set("auto", side, side // 2) == expected
    assert constant_set("cifar", side, side) == "cifar"


def test_unknown_constants_are_refused():
    with pytest.raises(KeyError, match="unknown corruption constants 'cifar10'"):
        constant_set("cifar10", 32, 32)


@pytest.mark.parametrize(
    "size,constants,sigma", [(32, "auto", 0.10), (64, "auto", 0.18), (224, "auto", 0.38), (224, "cifar", 0.10), (32, "imagenet", 0.38)]
)
def test_gaussian_noise_has_the_sigma_of_its_constants(size, constants, sigma):
    """Severity 5: CIFAR-10-C's 0.10, Tiny-ImageNet-C's 0.18, ImageNet-C's 0.38 (the issue: 224 px
    images got CIFAR's 0.10). Mid-grey, so nothing clips at 3 sigma of 0.10 (the wider ones clip:
    their spread is checked on the unclipped values)."""
    grey = torch.full((8, 1, size, size), 128, dtype=torch.uint8)
    out = C.corrupt(grey, "gaussian_noise", 5, 0, torch.arange(8), constants=constants).float()
    inside = (out > 0) & (out < 255)
    delta = (out[inside] - 128 + 0.5) / 255  # truncation lowers every value by half a level on average
    if sigma == 0.10:
        assert delta.std().item() == pytest.approx(sigma, rel=0.05)
        assert abs(delta.mean().item()) < 0.002
    else:  # a normal truncated to [-128/255, 127/255]: compare with the truncated normal's spread
        z = np.random.default_rng(0).normal(scale=sigma, size=400_000)
        z = z[(z > -128 / 255) & (z < 127 / 255)]
        assert delta.std().item() == pytest.approx(z.std(), rel=0.05)


def test_impulse_noise_flips_its_share_to_black_or_white():
    grey = torch.full((64, 1, 32, 32), 128, dtype=torch.uint8)
    hit = C.corrupt(grey, "impulse_noise", 5, 0, torch.arange(64))
    flipped = hit != 128
    assert flipped.float().mean().item() == pytest.approx(0.07, rel=0.08)  # amount = 0.07 (CIFAR-10-C)
    assert set(hit[flipped].unique().tolist()) == {0, 255}


def test_contrast_and_brightness_equal_their_formulas(images):
    x = images["rgb"]
    out = C.corrupt(x, "contrast", 4, 0, torch.arange(12)).numpy().astype(float)
    v = x.numpy() / 255.0
    mean = v.mean(axis=(2, 3), keepdims=True)
    assert np.abs(out - np.floor(np.clip((v - mean) * 0.3 + mean, 0, 1) * 255)).max() <= 1
    # brightness: +0.2 on the HSV value channel, per pixel through colorsys, truncated
    out = C.corrupt(x[:2], "brightness", 4, 0, torch.arange(2)).numpy()
    for n in range(2):
        for i, j in [(0, 0), (10, 12), (16, 16), (31, 5)]:
            h, s, val = colorsys.rgb_to_hsv(*(v[n, :, i, j]))
            expected = np.floor(np.array(colorsys.hsv_to_rgb(h, s, min(val + 0.2, 1.0))) * 255)
            assert np.abs(out[n, :, i, j] - expected).max() <= 1


def test_pixelate_and_jpeg_are_pils_own_at_the_chosen_constants(images):
    x = images["grey"][:3]
    for constants, factor, quality in [("cifar", 0.65, 40), ("tinyimagenet", 0.5, 25), ("imagenet", 0.25, 7)]:
        pixelated = C.corrupt(x, "pixelate", 5, 0, torch.arange(3), constants=constants)
        compressed = C.corrupt(x, "jpeg_compression", 5, 0, torch.arange(3), constants=constants)
        for n in range(3):
            image = Image.fromarray(x[n, 0].numpy())
            small = image.resize((int(32 * factor), int(32 * factor)), Image.BOX).resize((32, 32), Image.BOX)
            assert np.array_equal(pixelated[n, 0].numpy(), np.asarray(small))
            buffer = io.BytesIO()
            image.save(buffer, "JPEG", quality=quality)
            assert np.array_equal(compressed[n, 0].numpy(), np.asarray(Image.open(buffer)))


def test_glass_blur_copies_pixels_one_after_another():
    """The vectorised glass blur equals the reference's loop read literally (each step copies
    ``(h + dy, w + dx)`` into ``(h, w)``), with ImageNet-C's max_delta 4, where a pixel reads one
    copied earlier in its own row, sometimes through a chain of such copies. Mutations checked:
    not following the copies within a row, and following only one link of a chain (no pointer
    jumping), each fail this test."""
    rng = np.random.default_rng(0)
    u = rng.integers(0, 256, size=(2, 56, 52, 3), dtype=np.uint8)
    sigma, delta, iterations = CONSTANTS["imagenet"]["glass_blur"][4]
    seeds = [[1, 2], [3, 4]]
    ours = C.glass_blur(u, (sigma, delta, iterations), [np.random.RandomState(s) for s in seeds], "imagenet")
    expected = []
    for image, seed in zip(u, seeds):
        state = np.random.RandomState(seed)
        x = (ops.gaussian_filter(image[None] / 255.0, sigma)[0] * 255).astype(np.uint8)
        for _ in range(iterations):
            for h in range(56 - delta, delta, -1):
                for w in range(52 - delta, delta, -1):
                    dx, dy = state.randint(-delta, delta, size=(2,))
                    x[h, w] = x[h + dy, w + dx]
        expected.append(np.clip(ops.gaussian_filter(x[None] / 255.0, sigma)[0], 0, 1) * 255)
    assert np.array_equal(ours, np.stack(expected))


def test_zoom_and_sampling_equal_scipy_bit_for_bit():
    """Mutation checked: SciPy's second linear weight ``1 - (1 - t)`` written ``t`` fails."""
    rng = np.random.default_rng(1)
    for dtype in (np.float32, np.float64):  # zoom_blur zooms float32, snow float64
        x = rng.random((2, 19, 23, 3)).astype(dtype)
        for factor in (1.06, 1.31, 2.25, 4.5):
            expected = np.stack([ndi.zoom(image, (factor, factor, 1), order=1) for image in x])
            assert np.array_equal(ops.zoom_linear(x, factor), expected)
    x = rng.random((2, 19, 23, 3)).astype(np.float32)
    rows = rng.uniform(-3, 22, size=(2, 19, 23))
    cols = rng.uniform(-3, 26, size=(2, 19, 23))
    expected = np.stack(
        [
            ndi.map_coordinates(
                image, (np.repeat(r.ravel(), 3), np.repeat(c.ravel(), 3), np.tile(np.arange(3), r.size)), order=1, mode="reflect"
            ).reshape(19, 23, 3)
            for image, r, c in zip(x, rows, cols)
        ]
    )
    assert np.array_equal(ops.sample_linear(x, rows, cols), expected)


def test_frost_blends_a_shipped_photograph_crop():
    """Frost ships with the package; at 32 px it crops the 0.2-scaled photograph; at 300 px
    (larger than any photograph) the photograph is enlarged first."""
    assert (C.FROST_DIR / "LICENSE").is_file() and (C.FROST_DIR / "NOTICE").is_file()
    black = torch.zeros((4, 3, 32, 32), dtype=torch.uint8)
    out = C.corrupt(black, "frost", 1, 0, torch.arange(4))  # c = (1, 0.2): 0.2 x the photograph
    seed = C.sample_seed(0, "frost", 1, 2)
    state = np.random.RandomState(seed)
    photo = C.frost_photo(C.FROST_PHOTOS[state.randint(5)], "020")
    top, left = state.randint(0, photo.shape[0] - 32), state.randint(0, photo.shape[1] - 32)
    expected = (0.2 * photo[top : top + 32, left : left + 32]).astype(np.uint8)
    assert np.array_equal(out[2].permute(1, 2, 0).numpy(), expected)
    big = C.corrupt(torch.zeros((1, 3, 300, 300), dtype=torch.uint8), "frost", 5, 0, torch.arange(1))
    assert big.shape == (1, 3, 300, 300) and big.float().mean() > 20


def test_corrupted_dataset_gathers_corrupted_batches_with_clean_labels(images):
    base = ArrayDataset(images["grey"], images["labels"], "digits32")
    ds = C.CorruptedDataset(base, "fog", 2, seed=3)
    idx = torch.tensor([4, 0, 7])
    x, y = ds.gather(idx)
    assert torch.equal(x, C.corrupt(images["grey"][idx], "fog", 2, 3, idx))
    assert torch.equal(y, images["labels"][idx])
    assert torch.equal(ds[7][0], x[2])
    same = C.CorruptedDataset(base, "fog", 2, seed=3).fingerprint
    assert ds.fingerprint == same
    assert (
        len(
            {
                same,
                C.CorruptedDataset(base, "fog", 3, 3).fingerprint,
                C.CorruptedDataset(base, "fog", 2, 4).fingerprint,
                C.CorruptedDataset(base, "fog", 2, 3, "imagenet").fingerprint,
                base.fingerprint,
            }
        )
        == 5
    )
    imagenet = C.CorruptedDataset(base, "fog", 2, 3, "imagenet").gather(idx)[0]
    assert torch.equal(imagenet, C.corrupt(images["grey"][idx], "fog", 2, 3, idx, constants="imagenet"))
    assert not torch.equal(imagenet, x)


def test_bad_arguments_are_refused(images):
    with pytest.raises(KeyError, match="unknown corruption 'frosty'"):
        C.corrupt(images["grey"], "frosty", 1, 0, torch.arange(12))
    with pytest.raises(ValueError, match="severity must be 1..5"):
        C.corrupt(images["grey"], "fog", 6, 0, torch.arange(12))
