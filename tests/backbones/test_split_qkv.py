"""Split query/key/value projections: same features as the fused layer; LoRA on k and v spares q."""

from __future__ import annotations

import pytest
import torch

from clpeft.backbones.split_qkv import SplitQKV, split_qkv
from clpeft.backbones.timm_backbone import TimmBackbone
from clpeft.backbones.vit import forward_prompted
from clpeft.components.lora import inject_lora
from clpeft.errors import UserError


def _backbones():
    torch.manual_seed(0)
    fused = TimmBackbone((1, 28, 28), model="vit_tiny_patch16_224", img_size=32)
    torch.manual_seed(0)
    split = TimmBackbone((1, 28, 28), model="vit_tiny_patch16_224", img_size=32, split_qkv=True)
    return fused, split


def test_split_layer_holds_the_row_blocks_and_concatenates_them():
    fused = torch.nn.Linear(8, 24)
    layer = SplitQKV(fused)
    for i, part in enumerate((layer.q, layer.k, layer.v)):
        assert torch.equal(part.weight, fused.weight[i * 8 : (i + 1) * 8])
        assert torch.equal(part.bias, fused.bias[i * 8 : (i + 1) * 8])
    x = torch.randn(3, 5, 8)
    torch.testing.assert_close(layer(x), fused(x), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="3 x d"):
        SplitQKV(torch.nn.Linear(8, 10))


def test_split_backbone_gives_the_fused_features_plain_and_prompted():
    fused, split = _backbones()
    assert sum(isinstance(m, SplitQKV) for m in split.modules()) == len(split.net.blocks)
    assert all(not p.requires_grad for p in split.parameters())  # frozen like the fused one
    x = torch.rand(4, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(split(x), fused(x), rtol=1e-5, atol=1e-5)
        prefixes = {0: (torch.randn(4, 3, 192), torch.randn(4, 3, 192))}  # DualPrompt/CODA-style prefix
        torch.testing.assert_close(
            forward_prompted(split.net, split.preprocess(x), prefixes=prefixes),
            forward_prompted(fused.net, fused.preprocess(x), prefixes=prefixes),
            rtol=1e-5,
            atol=1e-5,
        )
    assert split.describe()["split_qkv"] and "split_qkv" not in fused.describe()  # distinct feature-cache identities


def test_lora_on_k_and_v_leaves_the_queries_unchanged():
    _, split = _backbones()
    layers = inject_lora(split, ["qkv.k", "qkv.v"], rank=2, alpha=2.0)
    assert sorted(layers)[:2] == ["net.blocks.0.attn.qkv.k", "net.blocks.0.attn.qkv.v"] and len(layers) == 2 * 12
    attn = split.net.blocks[0].attn
    tokens = torch.randn(2, 5, 192)
    before = attn.qkv(tokens).detach()
    with torch.no_grad():
        for layer in layers.values():
            layer.lora_B.normal_()
    after = attn.qkv(tokens).detach()
    assert torch.equal(after[..., :192], before[..., :192])  # q untouched
    assert not torch.allclose(after[..., 192:], before[..., 192:])  # k and v adapted


def test_split_qkv_on_a_model_without_attention_is_refused():
    assert split_qkv(torch.nn.Sequential(torch.nn.Linear(4, 4))) == 0
    with pytest.raises(UserError, match="^backbone.split_qkv: 'resnet18' has no fused qkv"):
        TimmBackbone((3, 32, 32), model="resnet18", split_qkv=True)
