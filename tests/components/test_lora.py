"""Tests for ``clpeft.components.lora``: LoRALinear, dynamic rank, injection, adapter files.

The reference for the forward and backward pass is peft's own LoRA layer: same base layer, same
factors, same outputs and gradients to 1e-6. Growth, pruning and merging are checked against
what they must preserve; injection against the layer names of real timm and transformers models.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors import safe_open
from torch import nn

from clpeft.components.lora import (
    LoRALinear,
    inject_lora,
    layer_depths,
    layer_ranks,
    load_adapters,
    lora_layers,
    save_adapters,
)
from clpeft.errors import UserError

VIT_TARGETS = ["qkv", "proj", "fc1", "fc2"]


class _OneLinear(nn.Module):
    def __init__(self, base: nn.Linear):
        super().__init__()
        self.fc = base

    def forward(self, x):
        return self.fc(x)


def _trained(layer: LoRALinear, seed: int = 0) -> LoRALinear:
    """``layer`` with a nonzero B, as after some training."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        layer.lora_B.copy_(torch.randn(layer.lora_B.shape, generator=gen))
    return layer


def _pair(peft, rank=4, alpha=8.0, dropout=0.0):
    """A LoRALinear and peft's LoRA on identical copies of one base layer, with the same factors."""
    torch.manual_seed(0)
    base = nn.Linear(16, 12)
    ours = _trained(LoRALinear(copy.deepcopy(base), rank, alpha, dropout))
    config = peft.LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=["fc"])
    theirs = peft.get_peft_model(_OneLinear(copy.deepcopy(base)), config)
    fc = theirs.base_model.model.fc
    with torch.no_grad():
        fc.lora_A["default"].weight.copy_(ours.lora_A)
        fc.lora_B["default"].weight.copy_(ours.lora_B)
    return ours, theirs, fc


def _vit(seed: int = 0) -> nn.Module:
    timm = pytest.importorskip("timm")
    torch.manual_seed(seed)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=4, num_classes=5).eval()


# ---------------------------------------------------------------------- agreement with peft


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_output_and_gradients_equal_peft(peft, dropout):
    ours, theirs, fc = _pair(peft, dropout=dropout)
    ours.train(), theirs.train()
    x = torch.randn(3, 5, 16)
    x_ours, x_theirs = x.clone().requires_grad_(), x.clone().requires_grad_()
    torch.manual_seed(1)  # same dropout mask on both sides
    y_ours = ours(x_ours)
    torch.manual_seed(1)
    y_theirs = theirs(x_theirs)
    torch.testing.assert_close(y_ours, y_theirs, rtol=0, atol=1e-6)
    assert (y_ours - ours.base_layer(x)).abs().max() > 1e-2  # the LoRA path contributes

    upstream = torch.randn_like(y_ours)
    (y_ours * upstream).sum().backward()
    (y_theirs * upstream).sum().backward()
    torch.testing.assert_close(ours.lora_A.grad, fc.lora_A["default"].weight.grad, rtol=0, atol=1e-6)
    torch.testing.assert_close(ours.lora_B.grad, fc.lora_B["default"].weight.grad, rtol=0, atol=1e-6)
    torch.testing.assert_close(x_ours.grad, x_theirs.grad, rtol=0, atol=1e-6)
    assert ours.base_layer.weight.grad is None and not ours.base_layer.weight.requires_grad


def test_delta_weight_equals_peft(peft):
    ours, _, fc = _pair(peft, rank=3, alpha=5.0)
    torch.testing.assert_close(ours.delta_weight(), fc.get_delta_weight("default"), rtol=0, atol=1e-6)
    assert ours.alpha == 5.0 and ours.scaling == 5.0 / 3


def test_initial_layer_equals_base_and_a_has_peft_init():
    torch.manual_seed(0)
    base = nn.Linear(64, 8)
    layer = LoRALinear(base, rank=32, alpha=16)
    assert torch.equal(layer.lora_B, torch.zeros(8, 32))
    bound = 64**-0.5  # kaiming-uniform with a=sqrt(5): U(-1/sqrt(in), 1/sqrt(in))
    assert layer.lora_A.abs().max() <= bound and layer.lora_A.abs().max() > 0.9 * bound
    x = torch.randn(4, 64)
    assert torch.equal(layer(x), base(x))


# ---------------------------------------------------------------------- dynamic rank


def test_grow_keeps_outputs_and_old_factors():
    layer = _trained(LoRALinear(nn.Linear(10, 7), rank=3, alpha=6.0))
    x = torch.randn(5, 10)
    before, delta = layer(x).detach(), layer.delta_weight().detach()
    a, b = layer.lora_A.detach().clone(), layer.lora_B.detach().clone()

    layer.grow(4)

    assert layer.rank == 7 and layer.scaling == 2.0 and layer.alpha == 14.0
    assert torch.equal(layer.lora_A[:3], a) and torch.equal(layer.lora_B[:, :3], b)
    assert torch.equal(layer.lora_B[:, 3:], torch.zeros(7, 4)) and layer.lora_A[3:].abs().min() > 0
    torch.testing.assert_close(layer(x), before, rtol=0, atol=1e-6)
    torch.testing.assert_close(layer.delta_weight(), delta, rtol=0, atol=1e-6)
    assert layer.lora_A.requires_grad and layer.lora_B.requires_grad
    layer(x).square().sum().backward()
    assert layer.lora_B.grad[:, 3:].abs().sum() > 0  # the new components can learn


def test_grow_keeps_outputs_bitwise_in_float64():
    layer = _trained(LoRALinear(nn.Linear(10, 7).double(), rank=2, alpha=2.0).double())
    x = torch.randn(5, 10, dtype=torch.float64)
    before = layer(x).detach()
    layer.grow(1)
    assert layer.lora_A.dtype == torch.float64
    torch.testing.assert_close(layer(x), before, rtol=0, atol=1e-12)


def _known_importance_layer() -> LoRALinear:
    """Components i = 0..3 read only input feature i; equal |B_i|, |A_i| except component 1 (3x larger)."""
    layer = LoRALinear(nn.Linear(6, 4), rank=4, alpha=4.0)
    with torch.no_grad():
        layer.lora_A.copy_(torch.eye(4, 6) * torch.tensor([[1.0], [3.0], [1.0], [1.0]]))
        layer.lora_B.copy_(torch.eye(4))
    return layer


def test_prune_keeps_the_components_with_most_input_weighted_importance():
    layer = _known_importance_layer()
    feature_scale = torch.tensor([5.0, 0.01, 10.0, 1.0, 1.0, 1.0])  # component 1 reads a near-dead input; 2 beats 0
    layer.track_importance = True
    batches = [torch.randn(8, 3, 6) * feature_scale for _ in range(4)]
    for x in batches:
        layer(x)
    everything = torch.cat([x.reshape(-1, 6) for x in batches])
    assert layer.input_count == everything.shape[0]
    torch.testing.assert_close(layer.input_sq_mean, everything.square().mean(0))
    rms = everything.square().mean(0).sqrt()
    expected = torch.tensor([1.0, 3.0, 1.0, 1.0]) * rms[:4]  # ||B_i|| * ||A_i * rms||
    torch.testing.assert_close(layer.importance(), expected)

    x = torch.randn(2, 6)
    kept_delta = layer.lora_B[:, [0, 2]] @ layer.lora_A[[0, 2]] * layer.scaling
    kept = layer.prune(2)

    assert kept.tolist() == [0, 2] and layer.rank == 2 and layer.scaling == 1.0
    torch.testing.assert_close(layer.delta_weight(), kept_delta)
    torch.testing.assert_close(layer(x), layer.base_layer(x) + x @ kept_delta.T)


def test_prune_without_statistics_uses_magnitude():
    layer = _known_importance_layer()
    layer(torch.randn(3, 6))  # not tracked
    assert layer.input_count == 0
    assert layer.prune(1).tolist() == [1]
    with pytest.raises(UserError, match="keep"):
        layer.prune(2)


def test_reset_importance_forgets_statistics():
    layer = _known_importance_layer()
    layer.track_importance = True
    layer(torch.randn(3, 6))
    layer.reset_importance()
    assert layer.input_count == 0 and layer.input_sq_mean.abs().sum() == 0


# ---------------------------------------------------------------------- merging


def test_merge_unmerge_round_trip():
    torch.manual_seed(0)
    layer = _trained(LoRALinear(nn.Linear(32, 24), rank=8, alpha=16.0))
    original = layer.base_layer.weight.detach().clone()
    x = torch.randn(6, 32)
    unmerged = layer(x).detach()

    layer.merge()
    assert layer.merged
    torch.testing.assert_close(layer.base_layer.weight, original + layer.delta_weight(), rtol=0, atol=1e-6)
    torch.testing.assert_close(layer(x), unmerged, rtol=0, atol=1e-5)
    torch.testing.assert_close(layer(x), layer.base_layer(x))  # merged forward is the base layer alone
    layer.merge()  # idempotent
    with pytest.raises(RuntimeError, match="unmerge"):
        layer.grow(1)

    layer.unmerge()
    assert not layer.merged
    torch.testing.assert_close(layer.base_layer.weight, original, rtol=0, atol=1e-6)
    torch.testing.assert_close(layer(x), unmerged, rtol=0, atol=1e-6)


# ---------------------------------------------------------------------- injection and schedules


def test_inject_into_vit_wraps_targets_and_freezes_all_but_lora():
    model = _vit()
    reference = copy.deepcopy(model)
    layers = inject_lora(model, VIT_TARGETS, rank=4, alpha=8)

    assert len(layers) == 4 * 4
    assert list(layers)[:4] == ["blocks.0.attn.qkv", "blocks.0.attn.proj", "blocks.0.mlp.fc1", "blocks.0.mlp.fc2"]
    assert isinstance(model.blocks[2].mlp.fc1, LoRALinear) and isinstance(model.head, nn.Linear)
    assert lora_layers(model) == layers
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{name}.{f}" for name in layers for f in ("lora_A", "lora_B")}
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(model(x), reference(x), rtol=0, atol=1e-6)  # B = 0: the model is unchanged
    model(x).sum().backward()
    assert all(layer.lora_B.grad.abs().sum() > 0 for layer in layers.values())


def test_rank_schedules_on_vit():
    def ranks(**kw):
        return [layer.rank for layer in inject_lora(_vit(), VIT_TARGETS, alpha=8, **kw).values()]

    assert ranks(rank=4) == [4] * 16
    # PRILoRA: linear in the block index, from rank (block 0) to max_rank (block 3), shared within a block
    assert ranks(rank=2, rank_schedule="linear", max_rank=8) == [2] * 4 + [4] * 4 + [6] * 4 + [8] * 4
    assert ranks(rank=4, rank_schedule="linear", max_rank=12) == [4] * 4 + [7] * 4 + [9] * 4 + [12] * 4
    explicit = list(range(1, 17))
    assert ranks(rank=0, rank_schedule=explicit) == explicit
    model = _vit()
    layers = inject_lora(model, ["fc2"], rank=2, alpha=8, rank_schedule="linear", max_rank=5)
    assert {name: layer.rank for name, layer in layers.items()} == {f"blocks.{i}.mlp.fc2": 2 + i for i in range(4)}
    assert [layer.scaling for layer in layers.values()] == [8 / r for r in (2, 3, 4, 5)]


def test_rank_schedule_errors():
    names = ["blocks.0.attn.qkv", "blocks.1.attn.qkv"]
    with pytest.raises(UserError, match="2 adapted layers"):
        layer_ranks(names, 4, [4, 4, 4])
    with pytest.raises(UserError, match="max_rank"):
        layer_ranks(names, 4, "linear")
    with pytest.raises(UserError, match="unknown rank_schedule"):
        layer_ranks(names, 4, "cosine")
    with pytest.raises(UserError, match="ends with"):
        inject_lora(_OneLinear(nn.Linear(2, 2)), ["qkv"], rank=2, alpha=2)


def test_layer_depths_use_block_index_else_module_order():
    assert layer_depths(["blocks.3.attn.qkv", "blocks.3.mlp.fc1", "blocks.10.mlp.fc2"]) == [3, 3, 10]
    assert layer_depths(["model.layers.2.self_attn.q_proj", "model.layers.5.self_attn.v_proj"]) == [2, 5]
    assert layer_depths(["encoder.fc", "decoder.fc", "blocks.1.fc"]) == [0, 1, 2]
    assert layer_ranks(["a", "b", "c"], 2, "linear", max_rank=6) == [2, 4, 6]
    assert layer_ranks(["only.one"], 2, "linear", max_rank=6) == [2]


def test_inject_into_transformers_bert_by_name_suffix():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=3, num_attention_heads=2, intermediate_size=20)
    model = transformers.BertModel(config)
    layers = inject_lora(model, ["query", "value"], rank=2, alpha=4, rank_schedule="linear", max_rank=6)
    assert {name: layer.rank for name, layer in layers.items()} == {
        f"encoder.layer.{i}.attention.self.{t}": 2 + 2 * i for i in range(3) for t in ("query", "value")
    }
    out = model(input_ids=torch.tensor([[1, 2, 3]])).last_hidden_state
    out.sum().backward()
    assert all(p.grad is None for n, p in model.named_parameters() if "lora_" not in n)


# ---------------------------------------------------------------------- state and adapter files


def _adapted_vit() -> tuple[nn.Module, dict[str, LoRALinear]]:
    model = _vit()
    layers = inject_lora(model, VIT_TARGETS, rank=4, alpha=8)
    for i, layer in enumerate(layers.values()):
        _trained(layer, seed=i)
        layer.lora_B.data.mul_(0.05)
    layers["blocks.1.mlp.fc1"].grow(3)
    layers["blocks.2.attn.qkv"].prune(2)
    return model, layers


def test_save_load_adapters_round_trip_small_file(tmp_path):
    model, layers = _adapted_vit()
    path = tmp_path / "adapters.safetensors"
    save_adapters(model, path)

    factor_bytes = sum(4 * (layer.lora_A.numel() + layer.lora_B.numel()) for layer in layers.values())
    assert path.stat().st_size < factor_bytes + 16 * 1024  # factors plus a small header: no base weights
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    assert meta["format"] == "clpeft.lora"
    assert json.loads(meta["layers"])["blocks.1.mlp.fc1"] == {"rank": 7, "alpha": 14.0}

    fresh = _vit()  # same base weights (same seed), LoRA at a different rank
    inject_lora(fresh, VIT_TARGETS, rank=1, alpha=1)
    loaded = load_adapters(fresh, path)
    assert {n: (m.rank, m.scaling) for n, m in loaded.items()} == {n: (m.rank, m.scaling) for n, m in layers.items()}
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(fresh(x), model(x))


def test_load_adapters_rejects_a_model_that_does_not_fit(tmp_path):
    model, _ = _adapted_vit()
    path = tmp_path / "adapters.safetensors"
    save_adapters(model, path)
    other = _vit()
    inject_lora(other, ["qkv"], rank=4, alpha=8)
    with pytest.raises(UserError, match="only in the file"):
        load_adapters(other, path)


def test_adapter_file_is_read_by_the_merging_module(tmp_path):
    from clpeft.merging.lora import open_model

    model, layers = _adapted_vit()
    path = tmp_path / "adapters.safetensors"
    save_adapters(model, path)
    adapter = open_model(path)
    assert set(adapter.layers) == {f"{name}.weight" for name in layers}
    for name, layer in layers.items():
        delta = adapter.delta(f"{name}.weight", device=torch.device("cpu"), dtype=torch.float32)
        torch.testing.assert_close(delta, layer.delta_weight().detach().reshape(-1), rtol=1e-6, atol=1e-7)


def test_state_dict_resizes_a_fresh_model_and_keeps_scaling():
    model, _ = _adapted_vit()
    fresh = _vit(seed=1)
    inject_lora(fresh, VIT_TARGETS, rank=4, alpha=2)
    fresh.load_state_dict(model.state_dict())
    assert fresh.blocks[1].mlp.fc1.rank == 7 and fresh.blocks[2].attn.qkv.rank == 2
    assert fresh.blocks[0].attn.qkv.scaling == 2.0  # 8 / 4 from the saved layer, not 2 / 4
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(fresh(x), model(x))


# ---------------------------------------------------------------------- one update per task


def _two_task_layer(old: str):
    """A layer after training "task 1" (rank 3), retired with ``old``, then "task 2" trained (rank 2)."""
    torch.manual_seed(0)
    layer = _trained(LoRALinear(nn.Linear(10, 7), rank=3, alpha=6.0), seed=1)
    x = torch.randn(5, 10)
    before, first = layer(x).detach(), layer.delta_weight().detach()
    a1, b1 = layer.lora_A.detach().clone(), layer.lora_B.detach().clone()
    layer.new_update(2, alpha=1.0, old=old)
    if old != "discard":
        torch.testing.assert_close(layer(x), before, rtol=0, atol=1e-6)  # a fresh update changes nothing
    assert layer.rank == 2 and layer.scaling == 0.5 and torch.equal(layer.lora_B, torch.zeros(7, 2))
    _trained(layer, seed=2)
    return layer, x, first, (a1, b1)


def test_new_update_freeze_keeps_the_old_factors_out_of_the_parameters():
    layer, x, first, (a1, b1) = _two_task_layer("freeze")
    assert layer.frozen_rank == 3
    assert torch.equal(layer.frozen_A, a1) and torch.equal(layer.frozen_B, b1)
    assert torch.equal(layer.frozen_scaling, torch.full((3,), 2.0))
    assert {n for n, _ in layer.named_parameters()} == {"base_layer.weight", "base_layer.bias", "lora_A", "lora_B"}
    expected = layer.base_layer(x) + x @ (first + layer.delta_weight()).T.detach()
    torch.testing.assert_close(layer(x), expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(layer.frozen_delta_weight(), first, rtol=0, atol=1e-6)

    layer(x).square().sum().backward()  # gradients reach the current update only
    assert layer.lora_B.grad.abs().sum() > 0 and not layer.frozen_A.requires_grad

    out = layer(x).detach()
    layer.merge()  # folds the frozen updates too
    torch.testing.assert_close(layer(x), out, rtol=0, atol=1e-5)
    layer.unmerge()


def test_new_update_merge_folds_the_old_update_into_the_base_weight():
    torch.manual_seed(0)
    original = LoRALinear(nn.Linear(10, 7), rank=3, alpha=6.0).base_layer.weight.detach().clone()
    layer, x, first, _ = _two_task_layer("merge")
    assert layer.frozen_rank == 0
    torch.testing.assert_close(layer.base_layer.weight, original + first, rtol=0, atol=1e-6)


def test_new_update_discard_drops_it():
    layer, x, first, _ = _two_task_layer("discard")
    layer.lora_B.data.zero_()
    assert layer.frozen_rank == 0 and torch.equal(layer(x), layer.base_layer(x))


def test_frozen_updates_round_trip_through_state_dict_and_adapter_files(tmp_path):
    model = _vit()
    layers = inject_lora(model, ["qkv", "fc2"], rank=3, alpha=6)
    for i, layer in enumerate(layers.values()):
        _trained(layer, seed=i).lora_B.data.mul_(0.05)
        layer.new_update(2, alpha=4.0)
        _trained(layer, seed=10 + i).lora_B.data.mul_(0.05)
    x = torch.randn(2, 3, 32, 32)
    expected = model(x)

    fresh = _vit()
    inject_lora(fresh, ["qkv", "fc2"], rank=1, alpha=1)
    fresh.load_state_dict(model.state_dict())  # resizes the frozen buffers
    assert all(m.frozen_rank == 3 and m.rank == 2 for m in lora_layers(fresh).values())
    assert torch.equal(fresh(x), expected)

    path = tmp_path / "whole.safetensors"
    save_adapters(model, path)  # one update per layer: frozen + current
    other = _vit()
    inject_lora(other, ["qkv", "fc2"], rank=1, alpha=1)
    loaded = load_adapters(other, path)
    assert all(m.frozen_rank == 0 and m.rank == 5 for m in loaded.values())
    torch.testing.assert_close(other(x), expected, rtol=0, atol=1e-5)


def test_inject_lora_names_the_config_key_and_the_linear_layers():
    with pytest.raises(UserError, match=r"^strategy\.targets: .*its linear layers are: fc"):
        inject_lora(_OneLinear(nn.Linear(3, 2)), ["qkv"], rank=1, alpha=1, key="strategy.targets")


# ---------------------------------------------------------------------- learnable scale (LAE)


def _scaled_layer(scale: float = 1.7) -> LoRALinear:
    torch.manual_seed(0)
    layer = _trained(LoRALinear(nn.Linear(10, 7), rank=3, alpha=6.0, learnable_scale=True))
    with torch.no_grad():
        layer.lora_scale.fill_(scale)
    return layer


def test_learnable_scale_multiplies_the_update_and_trains():
    """``y = W x + lora_scale * (alpha / r) B A x``; ``d y / d lora_scale`` is the unscaled update."""
    layer = _scaled_layer()
    assert {n for n, p in layer.named_parameters() if p.requires_grad} >= {"lora_A", "lora_B", "lora_scale"}
    x = torch.randn(5, 10)
    unscaled = x @ ((layer.lora_B @ layer.lora_A) * 2.0).T
    torch.testing.assert_close(layer(x), layer.base_layer(x) + 1.7 * unscaled, rtol=0, atol=1e-5)
    torch.testing.assert_close(layer.delta_weight(), 1.7 * 2.0 * layer.lora_B @ layer.lora_A, rtol=0, atol=1e-6)
    layer(x).sum().backward()
    torch.testing.assert_close(layer.lora_scale.grad, unscaled.sum().detach(), rtol=1e-5, atol=1e-5)
    assert "learnable_scale=True" in repr(layer)
    assert LoRALinear(nn.Linear(3, 2), rank=1, alpha=1.0).lora_scale is None  # off by default


@pytest.mark.parametrize("old", ["freeze", "merge"])
def test_learnable_scale_is_folded_into_a_retired_update_and_restarts_at_one(old):
    layer = _scaled_layer()
    x = torch.randn(4, 10)
    before = layer(x).detach()
    a, b, alpha = layer.combined_factors()
    torch.testing.assert_close(x @ ((alpha / a.shape[0]) * b @ a).T, before - layer.base_layer(x), rtol=0, atol=1e-5)
    layer.new_update(2, alpha=4.0, old=old)
    assert layer.lora_scale.item() == 1.0 and layer.lora_scale.requires_grad
    torch.testing.assert_close(layer(x), before, rtol=0, atol=1e-5)  # new B = 0: the output is kept


def test_learnable_scale_survives_state_dict_merge_and_adapter_files(tmp_path):
    model = _vit()
    layers = inject_lora(model, ["qkv"], rank=2, alpha=2, learnable_scale=True)
    for i, layer in enumerate(layers.values()):
        _trained(layer, seed=i).lora_B.data.mul_(0.05)
        layer.lora_scale.data.fill_(0.5 + i)
    x = torch.randn(2, 3, 32, 32)
    expected = model(x)
    fresh = _vit()
    inject_lora(fresh, ["qkv"], rank=2, alpha=2, learnable_scale=True)
    fresh.load_state_dict(model.state_dict())
    assert torch.equal(fresh(x), expected)
    for layer in layers.values():
        layer.merge()
    torch.testing.assert_close(model(x), expected, rtol=0, atol=1e-5)
    for layer in layers.values():
        layer.unmerge()
    path = tmp_path / "scaled.safetensors"
    save_adapters(model, path)  # B carries the scale
    other = _vit()
    inject_lora(other, ["qkv"], rank=1, alpha=1, learnable_scale=True)
    load_adapters(other, path)
    assert all(m.lora_scale.item() == 1.0 for m in lora_layers(other).values())
    torch.testing.assert_close(other(x), expected, rtol=0, atol=1e-5)


def test_lora_factors_share_and_override_the_learnable_scale():
    from torch.func import functional_call

    from clpeft.components.lora import LoRAFactors

    model = _vit()
    layers = inject_lora(model, ["blocks.0.attn.qkv"], rank=2, alpha=2, learnable_scale=True)
    _trained(layers["blocks.0.attn.qkv"])
    factors = LoRAFactors(layers)
    assert {n for n, _ in factors.named_parameters()} == {"0.lora_A", "0.lora_B", "0.lora_scale"}
    assert factors.get_submodule("0").lora_scale is layers["blocks.0.attn.qkv"].lora_scale
    copy_ = copy.deepcopy(factors)
    copy_.get_submodule("0").lora_scale.data.fill_(0.0)  # a copy whose update is switched off
    x = torch.randn(2, 3, 32, 32)
    layers["blocks.0.attn.qkv"].lora_B.data.zero_()
    plain = model(x)
    _trained(layers["blocks.0.attn.qkv"])
    assert not torch.allclose(model(x), plain)
    torch.testing.assert_close(functional_call(model, copy_.overrides(), (x,)), plain, rtol=0, atol=1e-6)
