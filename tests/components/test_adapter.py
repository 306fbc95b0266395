"""AdaptFormer parallel adapters injected into a tiny random timm ViT, and the weight-sharing copy."""

from __future__ import annotations

import pytest
import timm
import torch

from clpeft.components.lora.parallel_adapter import Adapter, ParallelAdapterBlock, inject_adapters, shared_weights_copy


def _vit():
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, num_classes=0).eval()


@pytest.fixture
def x():
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def test_zero_initialised_up_projection_leaves_the_output_identical(x):
    plain = _vit()
    adapted = shared_weights_copy(plain)
    adapters = inject_adapters(adapted, bottleneck=8)
    assert list(adapters) == ["blocks.0", "blocks.1"]
    assert all(isinstance(adapted.blocks[i], ParallelAdapterBlock) for i in range(2))
    assert all(torch.count_nonzero(a.up_proj.weight) == 0 for a in adapters.values())
    with torch.no_grad():
        assert torch.equal(adapted(x), plain(x))


def test_adapter_output_is_added_to_the_mlp_branch_input(x):
    """With trained (non-zero) adapters: each block adds s * up(relu(down(x'))) with x' the input
    of norm2, computed here on the plain model by a hook."""
    plain = _vit()
    adapted = shared_weights_copy(plain)
    adapters = inject_adapters(adapted, bottleneck=8, scale=0.1, dropout=0.0)
    torch.manual_seed(5)
    with torch.no_grad():
        for a in adapters.values():
            a.up_proj.weight.normal_()
            a.up_proj.bias.normal_()

    def manual(a, h):  # s * (relu(h W_down^T + b_down) W_up^T + b_up), from the raw tensors
        return 0.1 * (torch.relu(h @ a.down_proj.weight.T + a.down_proj.bias) @ a.up_proj.weight.T + a.up_proj.bias)

    for i, block in enumerate(plain.blocks):
        seen = {}
        block.norm2.register_forward_pre_hook(lambda m, args, seen=seen: seen.__setitem__("x", args[0]))
        block.register_forward_hook(lambda m, args, out, seen=seen, a=adapters[f"blocks.{i}"]: out + manual(a, seen["x"]))
    with torch.no_grad():
        torch.testing.assert_close(adapted(x), plain(x), rtol=1e-5, atol=1e-5)


def test_only_adapters_train_and_the_original_model_is_untouched(x):
    plain = _vit()
    before = {k: v.clone() for k, v in plain.state_dict().items()}
    reference = plain(x).detach()
    adapted = shared_weights_copy(plain)
    adapters = inject_adapters(adapted, bottleneck=4, layers=[1])
    assert isinstance(adapted.blocks[1], ParallelAdapterBlock) and not isinstance(adapted.blocks[0], ParallelAdapterBlock)
    trainable = {id(p) for p in adapted.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in adapters["blocks.1"].parameters()}
    # the copy shares the original's weight tensors
    assert adapted.blocks[0].attn.qkv.weight is plain.blocks[0].attn.qkv.weight
    opt = torch.optim.SGD([p for p in adapted.parameters() if p.requires_grad], lr=0.5)
    for _ in range(2):
        opt.zero_grad()
        adapted(x).square().mean().backward()
        opt.step()
    assert torch.count_nonzero(adapters["blocks.1"].up_proj.weight) > 0
    assert all(torch.equal(before[k], v) for k, v in plain.state_dict().items())
    assert torch.equal(plain(x).detach(), reference)
    assert not torch.equal(adapted(x).detach(), reference)


def test_wrapping_refuses_a_non_standard_block():
    with pytest.raises(TypeError, match="standard timm Blocks"):
        ParallelAdapterBlock(torch.nn.Linear(4, 4), Adapter(4, 2))
    with pytest.raises(ValueError, match="outside 0..1"):
        inject_adapters(_vit(), layers=[2])
