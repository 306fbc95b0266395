"""Prompt tokens and prefix key/value prompts injected into a timm ``VisionTransformer``.

Prompt-based continual-learning methods change what a frozen ViT attends to without changing
its weights. Two injection points cover the published methods:

* **prompt tokens** appended to the token sequence, after the class and register tokens and
  before the patch tokens, at a chosen layer -- L2P (Wang et al., "Learning to Prompt for
  Continual Learning", CVPR 2022, https://arxiv.org/abs/2112.08654) and VPT (Jia et al.,
  "Visual Prompt Tuning", ECCV 2022, https://arxiv.org/abs/2203.12119);
* **prefix keys and values** inside the self-attention of chosen layers (prefix-tuning, Li and
  Liang, https://arxiv.org/abs/2101.00190) -- DualPrompt (Wang et al., ECCV 2022,
  https://arxiv.org/abs/2204.04799) and CODA-Prompt (Smith et al., CVPR 2023,
  https://arxiv.org/abs/2211.13218). With prefix keys ``P_k`` and values ``P_v`` of shape
  ``(B, L_p, D)``, a layer attends with ``K = [P_k; K]`` and ``V = [P_v; V]``; the queries and
  the output length are unchanged. As in both papers' official code, the prefixes live in the
  projected key/value space (they are split into heads, not passed through ``W_K``/``W_V``).

Nothing of timm's model code is copied: :func:`forward_prompted` runs the model's own modules
(``patch_embed``, ``_pos_embed``, ``patch_drop``, ``norm_pre``, each block, ``norm``,
``forward_head``). A block without a prefix is called unchanged; a block with one is run by
:func:`block_with_prefix`, which calls that block's own ``norm1``, ``attn.qkv``, ``attn.q_norm``,
``attn.k_norm``, ``attn.proj``, ``ls1``, ``drop_path1``, ``norm2``, ``mlp``, ``ls2`` and
``drop_path2`` around :func:`torch.nn.functional.scaled_dot_product_attention`. LoRA or other
wrappers injected into those submodules therefore keep working.

With no prompts and no prefixes (or only empty ones) :func:`forward_prompted` returns exactly
``model.forward_head(model.forward_features(x), pre_logits=True)``, which is also the
*query feature* of L2P, DualPrompt and CODA-Prompt (:func:`query_features`): the frozen
backbone's ordinary output. A frozen :class:`~clpeft.backbones.timm_backbone.TimmBackbone`
returns the same tensor from ``forward``, so the feature cache already holds every sample's
query and a training step pays one (prompted) backbone pass, not two.
:class:`ForwardPassCounter` counts passes, to check that claim.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Attention, Block, VisionTransformer
from torch import nn
from torch.utils.checkpoint import checkpoint

Pool = Literal["default", "cls", "avg", "prompt_mean", "tokens"]
POOLS: tuple[str, ...] = ("default", "cls", "avg", "prompt_mean", "tokens")
#: Position embedding of prompt tokens: none, or the class token's (L2P's official code).
PromptPosition = Literal["none", "cls"]

#: Prompt tokens: one tensor (inserted at the input, layer 0) or ``{layer: tensor}``.
Prompts = torch.Tensor | Mapping[int, torch.Tensor]
#: Prefixes: ``{layer: (keys, values)}``; anything that unpacks into two tensors is a pair.
Prefixes = Mapping[int, Sequence[torch.Tensor]]


def forward_prompted(
    model: VisionTransformer,
    x: torch.Tensor,
    *,
    prompts: Prompts | None = None,
    prefixes: Prefixes | None = None,
    pool: Pool = "default",
    prompt_position: PromptPosition = "none",
) -> torch.Tensor:
    """Pre-logits features of a timm ViT with prompt tokens and prefix key/values injected.

    Args:
        model: a timm ``VisionTransformer`` (ViT, DeiT-3, DINOv2, with or without register
            tokens, ``no_embed_class``, ``dynamic_img_size``), usually frozen.
        x: model input ``(B, C, H, W)``, already preprocessed (resized and normalised).
        prompts: prompt tokens ``(B, L, D)`` or ``(L, D)`` (shared by the batch), ``D`` the
            embedding width. A tensor is inserted before the first block (L2P, shallow VPT).
            A mapping ``{layer: tokens}`` inserts them before block ``layer``; a later layer's
            tokens *replace* the prompt tokens present at that point (deep VPT). Prompt
            tokens sit right after the class/register tokens; their position embedding is
            ``prompt_position``'s.
        prefixes: ``{layer: (keys, values)}``, each ``(B, L_p, D_attn)`` or ``(L_p, D_attn)``
            with ``D_attn = num_heads * head_dim`` (the embedding width for timm ViTs), e.g. a
            ``(2, B, L_p, D_attn)`` tensor. Block ``layer`` attends with ``K = [keys; K]`` and
            ``V = [values; V]``. Prefixes go after ``q_norm``/``k_norm``: they are used as they
            are.
        pool: how to reduce the token sequence after the final norm:

            * ``"default"``: timm's own pooling (``model.forward_head(..., pre_logits=True)``)
              on the sequence without the prompt tokens -- the class token for ViT/DINOv2;
            * ``"cls"``: the class token;
            * ``"avg"``: the mean of the patch tokens (class, register and prompt tokens
              excluded);
            * ``"prompt_mean"``: the mean of the prompt tokens (L2P's classifier input);
            * ``"tokens"``: no pooling: ``(B, N, D)`` after the final norm, laid out as
              ``model.num_prefix_tokens`` class/register tokens, the prompt tokens, then the
              patch tokens.

            ``"cls"``, ``"avg"`` and ``"prompt_mean"`` then apply ``model.fc_norm`` and
            ``model.head_drop`` as timm does after its pooling.
        prompt_position: ``"none"``: prompt tokens get no position embedding; ``"cls"``: each
            gets the class token's, as in L2P's official code (JH-LEE-KR/l2p-pytorch, whose
            ``resize_pos_embed`` expands the pretrained [CLS] position embedding over the prompt
            positions). The offset is a constant: it shifts the prompts' effective
            initialisation, not their gradients.

    Returns:
        ``(B, D)`` features (``(B, N, D)`` for ``pool="tokens"``).

    Raises:
        TypeError: ``model`` is not a timm ``VisionTransformer``, or a block that gets a prefix
            is not a standard timm ``Block`` with ``Attention``.
        ValueError: a layer index out of range, a width or batch size that does not fit, or a
            pool or prompt position that needs what is missing (``"prompt_mean"`` without
            prompts, ``"cls"`` without a class token or its position embedding).
    """
    prompt_at = _prompt_layers(prompts)
    prefix_at = {layer: tuple(pair) for layer, pair in (prefixes or {}).items()}
    _check(model, x.shape[0], prompt_at, prefix_at, pool)
    offset = class_token_position(model) if prompt_position == "cls" else None
    # timm's forward_features, with a hook between blocks
    x = model.patch_embed(x)
    x = model._pos_embed(x)
    x = model.patch_drop(x)
    x = model.norm_pre(x)
    start, n_prompt = model.num_prefix_tokens, 0
    use_checkpoint = model.grad_checkpointing and torch.is_grad_enabled() and not torch.jit.is_scripting()
    for i, block in enumerate(model.blocks):
        if i in prompt_at:
            tokens = _batched(prompt_at[i], x.shape[0])
            tokens = (tokens if offset is None else tokens + offset).to(x.dtype)
            if tokens.shape[1] or n_prompt:
                x = torch.cat([x[:, :start], tokens, x[:, start + n_prompt :]], dim=1)
                n_prompt = tokens.shape[1]
        keys, values = prefix_at.get(i, (None, None))
        if keys is not None and keys.shape[-2] > 0:
            args = (block, x, keys, values)
            x = checkpoint(block_with_prefix, *args, use_reentrant=False) if use_checkpoint else block_with_prefix(*args)
        else:
            x = checkpoint(block, x, use_reentrant=False) if use_checkpoint else block(x)
    x = model.norm(x)
    return _pool(model, x, start, n_prompt, pool)


@torch.no_grad()
def query_features(model: VisionTransformer, x: torch.Tensor) -> torch.Tensor:
    """The query feature of prompt methods: the plain model's pre-logits feature, no gradient.

    This is ``model.forward_head(model.forward_features(x), pre_logits=True)`` -- the class
    token after the final norm for ViT and DINOv2 -- and equals a frozen ``TimmBackbone``'s
    output, so a strategy should take it from the feature cache instead of calling this.

    Args:
        model: a timm ``VisionTransformer``.
        x: preprocessed model input ``(B, C, H, W)``.
    """
    return model.forward_head(model.forward_features(x), pre_logits=True)


def class_token_position(model: VisionTransformer) -> torch.Tensor:
    """``(D,)`` position embedding of the class token (what L2P's official code gives its prompts).

    Raises:
        ValueError: the model has no class token, or no position embedding for it
            (``no_embed_class``, no ``pos_embed``).
    """
    if not model.has_class_token or model.no_embed_class or model.pos_embed is None:
        raise ValueError("prompt_position 'cls' needs a model whose class token has a position embedding")
    return model.pos_embed[0, 0]


def block_with_prefix(block: Block, x: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """One timm ``Block`` whose attention also attends to prefix keys and values.

    The block's own submodules do the work; only the attention call differs from
    ``Block.forward`` (see :func:`prefix_attention`).

    Args:
        block: a timm ``Block`` with a timm ``Attention``.
        x: tokens ``(B, N, D)``.
        keys, values: prefixes ``(B, L_p, D_attn)`` or ``(L_p, D_attn)``.

    Returns:
        ``(B, N, D)``.
    """
    x = x + block.drop_path1(block.ls1(prefix_attention(block.attn, block.norm1(x), keys, values)))
    return x + block.drop_path2(block.ls2(block.mlp(block.norm2(x))))


def prefix_attention(attn: Attention, x: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """timm ``Attention`` with prefix keys/values: ``softmax(Q [P_k; K]^T * scale) [P_v; V]``.

    Uses the module's ``qkv``, ``q_norm``, ``k_norm``, ``scale``, attention dropout, output
    norm and gate (in timm versions that have them), ``proj`` and ``proj_drop``.

    Args:
        attn: a timm ``Attention`` module.
        x: normalised tokens ``(B, N, D)``.
        keys, values: ``(B, L_p, D_attn)`` or ``(L_p, D_attn)``, split into ``attn.num_heads``
            heads like the projected keys and values.

    Returns:
        ``(B, N, D)``: one output per query token, as without prefixes.
    """
    B, N, _ = x.shape
    heads, head_dim = attn.num_heads, attn.head_dim
    gate = getattr(attn, "gate", None)
    gate = gate(x).sigmoid() if gate is not None else None
    q, k, v = attn.qkv(x).reshape(B, N, 3, heads, head_dim).permute(2, 0, 3, 1, 4).unbind(0)
    q, k = attn.q_norm(q), attn.k_norm(k)
    k = torch.cat([_heads(keys, B, heads, head_dim).to(k.dtype), k], dim=2)
    v = torch.cat([_heads(values, B, heads, head_dim).to(v.dtype), v], dim=2)
    dropout = attn.attn_drop.p if attn.training else 0.0
    out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=attn.scale)
    out = out.transpose(1, 2).reshape(B, N, heads * head_dim)
    out = getattr(attn, "norm", nn.Identity())(out)
    if gate is not None:
        out = out * gate
    return attn.proj_drop(attn.proj(out))


class ForwardPassCounter:
    """Counts forward passes through a timm ViT, plain or prompted.

    A forward hook on ``model.patch_embed`` (called exactly once per pass by timm's
    ``forward_features`` and by :func:`forward_prompted`) adds 1 to :attr:`calls` and the batch
    size to :attr:`samples`. A model without ``patch_embed`` (a CNN) is hooked itself. Passes per training step are ``calls / steps``; with a feature
    cache, ``samples / (steps * batch_size)`` also charges the cache's one-off passes.

    Use it as a context manager, or call :meth:`close` to remove the hook::

        with ForwardPassCounter(backbone.net) as passes:
            ...
        print(passes.calls, passes.samples)

    Hooks added after ``torch.compile`` traced the model may not be seen by the compiled code:
    count before compiling, or on an uncompiled run.
    """

    def __init__(self, model: nn.Module):
        self.calls = 0
        self.samples = 0
        self._handle = getattr(model, "patch_embed", model).register_forward_hook(self._count)

    def _count(self, module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        self.calls += 1
        self.samples += int(args[0].shape[0])

    def reset(self) -> None:
        """Set both counts to zero."""
        self.calls = self.samples = 0

    def close(self) -> None:
        """Stop counting (remove the hook); the counts stay readable."""
        self._handle.remove()

    def __enter__(self) -> ForwardPassCounter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def supports_prefix(block: nn.Module) -> bool:
    """Whether :func:`block_with_prefix` reproduces ``block``'s forward (a standard timm block)."""
    return (
        isinstance(block, Block)
        and type(block).forward is Block.forward
        and isinstance(block.attn, Attention)
        and type(block.attn).forward is Attention.forward
    )


# ---------------------------------------------------------------------- helpers


def _prompt_layers(prompts: Prompts | None) -> dict[int, torch.Tensor]:
    if prompts is None:
        return {}
    if isinstance(prompts, torch.Tensor):
        return {0: prompts}
    return dict(prompts)


def _batched(t: torch.Tensor, batch: int) -> torch.Tensor:
    """``(L, D)``, ``(1, L, D)`` or ``(B, L, D)`` -> ``(B, L, D)`` (a view when expanded)."""
    return (t.unsqueeze(0) if t.dim() == 2 else t).expand(batch, -1, -1)


def _heads(t: torch.Tensor, batch: int, heads: int, head_dim: int) -> torch.Tensor:
    """``(L, heads * head_dim)`` or ``(B, L, heads * head_dim)`` -> ``(B, heads, L, head_dim)``."""
    t = _batched(t, batch)
    return t.reshape(batch, t.shape[1], heads, head_dim).transpose(1, 2)


def _pool(model: VisionTransformer, x: torch.Tensor, start: int, n_prompt: int, pool: str) -> torch.Tensor:
    if pool == "tokens":
        return x
    prompt_tokens = x[:, start : start + n_prompt]
    if n_prompt:
        x = torch.cat([x[:, :start], x[:, start + n_prompt :]], dim=1)
    if pool == "default":
        return model.forward_head(x, pre_logits=True)
    if pool == "cls":
        feature = x[:, 0]
    elif pool == "avg":
        feature = x[:, start:].mean(dim=1)
    else:  # prompt_mean
        feature = prompt_tokens.mean(dim=1)
    return model.head_drop(model.fc_norm(feature))


def _shape_ok(t: torch.Tensor, batch: int, width: int) -> bool:
    return t.shape[-1] == width and (t.dim() == 2 or (t.dim() == 3 and t.shape[0] in (1, batch)))


def _check(model: nn.Module, batch: int, prompt_at: dict, prefix_at: dict, pool: str) -> None:
    if not isinstance(model, VisionTransformer):
        raise TypeError(f"expected a timm VisionTransformer, got {type(model).__name__}")
    depth, width = len(model.blocks), model.embed_dim
    for what, layers in (("prompts", prompt_at), ("prefixes", prefix_at)):
        bad = [layer for layer in layers if not (isinstance(layer, int) and 0 <= layer < depth)]
        if bad:
            raise ValueError(f"{what}: layer indices {bad} are outside 0..{depth - 1}")
    for layer, tokens in prompt_at.items():
        if not _shape_ok(tokens, batch, width):
            raise ValueError(f"prompts at layer {layer}: expected (L, {width}) or ({batch}, L, {width}), got {tuple(tokens.shape)}")
    for layer, pair in prefix_at.items():
        if len(pair) != 2:
            raise ValueError(f"prefixes at layer {layer}: expected a (keys, values) pair, got {len(pair)} items")
        keys, values = pair
        block = model.blocks[layer]
        if not supports_prefix(block):
            raise TypeError(
                f"prefixes at layer {layer}: block {type(block).__name__} with {type(block.attn).__name__} "
                "is not a standard timm Block with Attention"
            )
        attn_dim = block.attn.num_heads * block.attn.head_dim
        if keys.shape != values.shape or not _shape_ok(keys, batch, attn_dim):
            raise ValueError(
                f"prefixes at layer {layer}: keys {tuple(keys.shape)} and values {tuple(values.shape)} must both be "
                f"(L_p, {attn_dim}) or ({batch}, L_p, {attn_dim})"
            )
    if pool not in POOLS:
        raise ValueError(f"unknown pool '{pool}'; expected one of {', '.join(POOLS)}")
    if pool == "prompt_mean" and (not prompt_at or prompt_at[max(prompt_at)].shape[-2] == 0):
        raise ValueError("pool 'prompt_mean' needs prompt tokens (after the last prompt layer)")
    if pool == "cls" and not model.has_class_token:
        raise ValueError("pool 'cls' needs a model with a class token")
