"""``train.augment`` recipes against the official trainers' torchvision pipelines.

Each official pipeline is called on a PIL image exactly as its repository builds it, and
clpeft's recipe on the same image as a ``uint8`` tensor, after ``torch.manual_seed(k)`` on both
sides: the random crop boxes, flips and jitter factors are drawn from torch's generator in the
same order, so the outputs are the same images. Tolerance: 2/255 per pixel (PIL and tensor
bilinear resampling may round differently when shrinking; measured here: 0 when enlarging CIFAR's
32 px, below 1/255 on average when shrinking). Mutation checks (done once): scale (0.05, 1) ->
(0.08, 1) in ``clpeft.augment.RECIPES['crop_flip']``, and dropping the flip, each fail.
"""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch
from PIL import Image

from clpeft.augment import build_augment


def _images(size: int, n: int = 6) -> list[np.ndarray]:
    rng = np.random.default_rng(size)
    base = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    base[:, :, : size // 2] //= 3  # a left-right asymmetry, so a flip shows
    return list(base)


def _assert_same_pipeline(official, recipe: str, out_size: int, in_size: int) -> None:
    augment = build_augment(recipe, out_size)
    for k, image in enumerate(_images(in_size)):
        torch.manual_seed(k)
        want = official(Image.fromarray(image))
        torch.manual_seed(k)
        got = augment(torch.from_numpy(image).permute(2, 0, 1)[None])[0]
        assert got.shape == want.shape and got.dtype == want.dtype == torch.float32
        assert (got - want).abs().max() <= 2 / 255, (recipe, k, float((got - want).abs().max()))


def _l2p_stubs(stub_module) -> dict:
    names = ("continual_datasets", "continual_datasets.continual_datasets", "utils")
    return {name: stub_module(name) for name in names}


@pytest.mark.parametrize("folder", ["l2p-pytorch", "dualprompt-pytorch"])
@pytest.mark.parametrize("in_size", [32, 96])
def test_crop_flip_is_l2p_and_dualprompt_build_transform(load_reference, stub_module, folder, in_size):
    with load_reference(folder, "datasets", stubs=_l2p_stubs(stub_module)) as ref:
        official = ref.build_transform(True, types.SimpleNamespace(input_size=64))
    _assert_same_pipeline(official, "crop_flip", 64, in_size)


def test_crop_flip_is_pilots_build_transform(load_reference, stub_module):
    from torchvision import transforms

    with load_reference("pilot", "utils.data", stubs={"utils.toolkit": stub_module("utils.toolkit", split_images_labels=None)}) as ref:
        official = transforms.Compose(ref.build_transform(True, None))  # PILOT composes the list itself
    _assert_same_pipeline(official, "crop_flip", 224, 32)


def test_crop_flip_coda_is_coda_prompts_train_transform(load_reference):
    with load_reference("coda-prompt", "dataloaders.utils") as ref:
        official = ref.get_transform(dataset="ImageNet_R", phase="train")
    _assert_same_pipeline(official, "crop_flip_coda", 224, 48)


def test_crop_flip_jitter_is_pilots_imagenet_train_transform(load_reference, stub_module):
    from torchvision import transforms

    with load_reference("pilot", "utils.data", stubs={"utils.toolkit": stub_module("utils.toolkit", split_images_labels=None)}) as ref:
        official = transforms.Compose([*ref.iImageNet1000.train_trsf, transforms.ToTensor()])
    _assert_same_pipeline(official, "crop_flip_jitter", 224, 40)
