"""What the prompt-pool strategies (L2P, DualPrompt, CODA-Prompt) share around their pools.

* a check that the backbone can take prompts (a timm ``VisionTransformer``), with a clear error;
* the **query** ``q(x)``: the frozen backbone's own feature of ``x``. The engine serves it from
  the feature cache (``batch.features``), so a training step makes one (prompted) backbone pass;
  without it, :func:`query_of` pays the second pass that code without a cache pays on every step;

Their training-time class mask lives with the heads (:class:`~clpeft.components.heads.class_mask.ClassMask`):
non-prompt methods use it too.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from clpeft.errors import UserError


def promptable_width(backbone, method: str) -> int:
    """Token width ``D`` of a backbone that takes prompts and prefixes; a UserError for any other."""
    if not getattr(backbone, "promptable", False):
        raise UserError(
            f"strategy '{method}' injects prompts into a vision transformer, which {type(backbone).__name__} is not; "
            "use a timm ViT, e.g. backbone: {name: timm, model: vit_base_patch16_224.augreg_in21k, pretrained: true}",
            key="backbone.name",
        )
    return backbone.net.embed_dim


def check_layers(backbone, layers: Sequence[int], key: str) -> None:
    """A UserError naming ``key`` when a layer index is outside the backbone's blocks."""
    depth = len(backbone.net.blocks)
    bad = [layer for layer in layers if not 0 <= layer < depth]
    if bad:
        raise UserError(f"layers {bad} do not exist: the backbone has blocks 0..{depth - 1}", key=key)


def query_of(backbone, x: torch.Tensor, query: torch.Tensor | None) -> torch.Tensor:
    """The query feature ``q(x)``: ``query`` when the cache supplied it, else a frozen backbone pass."""
    if query is not None:
        return query
    with torch.no_grad():
        return backbone(x)
