"""Training-time augmentation (``train.augment``): the official trainers' recipes, or your own list.

Every official trainer of the pretrained-model methods augments its training images; evaluation
never does. A recipe is a list of ``torchvision.transforms.v2`` steps applied to each raw image
of a training batch (its own random draws per image, from torch's generator, which the engine
seeds per experience, so runs and resumes repeat exactly). ``size: auto`` is the backbone's
input resolution, so a 32-pixel CIFAR image is cropped and resized once, straight to 224, as the
official PIL pipelines do. Images stay ``uint8`` through the steps and leave as ``float32`` in
[0, 1]; the backbone then normalises them as usual.

Recipes (``train.augment: <name>``):

==================  ============================================================================
``none``            no augmentation (default)
``crop_flip``       ``RandomResizedCrop(auto, scale=(0.05, 1), ratio=(3/4, 4/3))`` + ``RandomHorizontalFlip()``:
                    ``build_transform`` of l2p-pytorch, dualprompt-pytorch and LAMDA-PILOT
                    (SimpleCIL, APER, RanPAC, ... on CIFAR-224 and ImageNet-R)
``crop_flip_coda``  ``RandomResizedCrop(auto)`` (scale 0.08-1) + ``RandomHorizontalFlip()``: CODA-Prompt's
                    ``dataloaders/utils.py`` and PILOT's ``build_transform_coda_prompt``
``crop_flip_jitter``  ``crop_flip_coda`` + ``ColorJitter(brightness=63/255)``: SLCA and PILOT's ImageNet
==================  ============================================================================

Or a list of steps, each ``{name: <transforms.v2 class>, <its arguments>}``, e.g.
``[{name: RandomCrop, size: 32, padding: 4}, {name: RandomHorizontalFlip}]``.

A frozen backbone's cached features cannot serve an augmented pass (each epoch sees other
crops): training batches then compute their features every step, and the cache serves
evaluation and the methods' own statistics passes only.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torchvision.transforms import v2

from clpeft.registry import close_matches

__all__ = ["RECIPES", "build_augment", "check_augment"]

AUTO = "auto"  # the backbone's input resolution

RECIPES: dict[str, list[dict[str, Any]]] = {
    "none": [],
    "crop_flip": [
        {"name": "RandomResizedCrop", "size": AUTO, "scale": [0.05, 1.0], "ratio": [3 / 4, 4 / 3]},
        {"name": "RandomHorizontalFlip", "p": 0.5},
    ],
    "crop_flip_coda": [{"name": "RandomResizedCrop", "size": AUTO}, {"name": "RandomHorizontalFlip", "p": 0.5}],
    "crop_flip_jitter": [
        {"name": "RandomResizedCrop", "size": AUTO},
        {"name": "RandomHorizontalFlip", "p": 0.5},
        {"name": "ColorJitter", "brightness": 63 / 255},
    ],
}
# Steps that only convert or normalise: the backbone does that, so a recipe must not.
_NOT_AUGMENTATIONS = {"ToTensor", "ToImage", "ToPILImage", "ToDtype", "ToPureTensor", "Normalize", "Compose"}


def _steps(spec: str | list[dict[str, Any]]) -> list[dict[str, Any]]:
    return RECIPES[spec] if isinstance(spec, str) else spec


def _transform(step: dict[str, Any], size: int) -> v2.Transform:
    kwargs = {k: (size if v == AUTO else tuple(v) if isinstance(v, list) else v) for k, v in step.items() if k != "name"}
    return getattr(v2, step["name"])(**kwargs)


def check_augment(spec: str | list[dict[str, Any]]) -> None:
    """Raise ``ValueError`` naming the first unknown recipe, transform or argument of ``spec``."""
    if isinstance(spec, str):
        if spec not in RECIPES:
            raise ValueError(f"unknown recipe {spec!r} (recipes: {', '.join(RECIPES)}){close_matches(spec, RECIPES)}")
        return
    for i, step in enumerate(spec):
        name = step.get("name")
        known = [
            n
            for n, obj in vars(v2).items()
            if isinstance(obj, type) and issubclass(obj, v2.Transform) and not n.startswith("_") and n not in _NOT_AUGMENTATIONS
        ]
        if name not in known:
            raise ValueError(f"step {i}: {name!r} is not a torchvision.transforms.v2 augmentation{close_matches(str(name), known)}")
        try:
            _transform(step, 224)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"step {i} ({name}): {exc}") from None


def build_augment(spec: str | list[dict[str, Any]], size: int | None) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """The batch augmentation of ``spec`` (``None`` for ``none``), at ``size`` pixels for ``auto``.

    The returned function takes raw images ``(B, H, W)`` or ``(B, C, H, W)`` (``uint8``, or floats
    in [0, 1]) and returns ``(B, C, size, size)`` ``float32`` images in [0, 1], each augmented with
    its own random draws.
    """
    steps = _steps(spec)
    if not steps:
        return None
    compose = v2.Compose([_transform(step, size) for step in steps])

    def augment(x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 3:
            x = x.unsqueeze(1)
        images = [compose(image) for image in x]
        out = torch.stack(images) if len({im.shape for im in images}) == 1 else None
        if out is None:
            raise ValueError(
                f"train.augment gave images of different sizes {sorted({tuple(im.shape) for im in images})}; "
                f"end the list with a step of a fixed size (e.g. RandomResizedCrop or Resize)"
            )
        return out.float() / 255.0 if out.dtype == torch.uint8 else out.float()

    return augment
