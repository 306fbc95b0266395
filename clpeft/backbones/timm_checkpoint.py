"""Fitting a timm checkpoint to a timm model: the classifier it carries, its position embedding.

These are the two adaptations a strict load of a timm checkpoint allows
(:mod:`clpeft.backbones.weights_file`): a checkpoint's classifier is left out when the model
has no head or a new one (as timm's ``load_pretrained`` does when ``num_classes`` differs), and
a ViT's absolute position embedding is resampled to the model's patch grid (as timm's
``checkpoint_filter_fn`` does for another ``img_size``).
"""

from __future__ import annotations

import torch
from timm.layers import resample_abs_pos_embed
from timm.models.vision_transformer import VisionTransformer


def classifier_names(net: torch.nn.Module) -> tuple[str, ...]:
    """Module paths of the classifier(s) in checkpoints of ``net``'s architecture (its pretrained config)."""
    names = net.pretrained_cfg.get("classifier") or ()
    return (names,) if isinstance(names, str) else tuple(names)


def fit_pos_embed(net: torch.nn.Module, tensors: dict[str, torch.Tensor], antialias: bool = True) -> dict[str, torch.Tensor]:
    """``tensors`` with a ViT's ``pos_embed`` resampled (bicubic) to ``net``'s patch grid; others unchanged."""
    stored, own = tensors.get("pos_embed"), getattr(net, "pos_embed", None)
    if not isinstance(net, VisionTransformer) or stored is None or own is None or stored.shape == own.shape:
        return tensors
    prefix = 0 if net.no_embed_class else net.num_prefix_tokens
    resized = resample_abs_pos_embed(
        stored, new_size=net.patch_embed.grid_size, num_prefix_tokens=prefix, interpolation="bicubic", antialias=antialias
    )
    return {**tensors, "pos_embed": resized}
