"""Tests for whole-model adapter routing: ``inject_multi_lora`` + ``route`` in ``clpeft.components.lora.batched``.

The reference for a mixed batch through a whole ViT is N separate models, each with only its own
LoRA adapter merged into the weights: every sample must come out of the multi-adapter model as
it comes out of its own adapter's merged model.
"""

from __future__ import annotations

import copy

import pytest
import torch

from clpeft.components.lora import LoRALinear, inject_lora, lora_layers
from clpeft.components.lora.batched import MultiLoRALinear, inject_multi_lora, route
from clpeft.errors import UserError

TARGETS = ["qkv", "proj", "fc1", "fc2"]
N_ADAPTERS = 3


def _vit():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, num_classes=4).eval()


def _task_models(base):
    """N copies of ``base``, each with its own trained LoRA (different ranks, one with a frozen past update)."""
    models = []
    for k in range(N_ADAPTERS):
        model = copy.deepcopy(base)
        layers = inject_lora(model, TARGETS, rank=2 + k, alpha=4.0)
        gen = torch.Generator().manual_seed(k)
        for layer in layers.values():
            with torch.no_grad():
                layer.lora_B.copy_(0.05 * torch.randn(layer.lora_B.shape, generator=gen))
            if k == 2:  # a layer holding a frozen past update as well
                layer.new_update(1, alpha=2.0)
                with torch.no_grad():
                    layer.lora_B.copy_(0.05 * torch.randn(layer.lora_B.shape, generator=gen))
        models.append(model)
    return models


def _multi(base, models):
    multi = copy.deepcopy(base)
    layers = inject_multi_lora(multi, TARGETS, N_ADAPTERS, rank=5, alpha=5.0)
    for k, model in enumerate(models):
        own = lora_layers(model)
        for name, layer in layers.items():
            layer.set_adapter(k, own[name])
    return multi, layers


def test_whole_vit_mixed_batch_equals_each_sample_through_its_own_merged_adapter():
    base = _vit()
    models = _task_models(base)
    multi, layers = _multi(base, models)
    assert len(layers) == 4 * 2 and all(isinstance(m, MultiLoRALinear) for m in layers.values())

    x = torch.randn(7, 3, 32, 32)
    ids = torch.tensor([2, 0, 1, 1, 0, 2, 2])
    with torch.no_grad(), route(multi, ids):
        mixed = multi(x)
    for model in models:
        for layer in lora_layers(model).values():
            layer.merge()
    with torch.no_grad():
        expected = torch.stack([models[int(k)](x[b : b + 1])[0] for b, k in enumerate(ids)])
        plain = base(x)
    torch.testing.assert_close(mixed, expected, rtol=0, atol=1e-5)
    assert (mixed - plain).abs().max() > 1e-2  # the adapters matter, so the check above could fail


def test_routing_is_scoped_and_trains_only_the_routed_adapters():
    base = _vit()
    multi, layers = _multi(base, _task_models(base))
    x = torch.randn(4, 3, 32, 32)
    with pytest.raises(UserError, match="route"):
        multi(x)
    with route(multi, torch.tensor([0, 0, 2, 2])):
        multi(x).square().sum().backward()
    assert all(layer.routing is None for layer in layers.values())  # restored on exit
    grads = torch.stack([layer.lora_B.grad.flatten(1).abs().sum(1) for layer in layers.values()]).sum(0)
    assert grads[0] > 0 and grads[2] > 0 and grads[1] == 0  # adapter 1 served no sample
    assert not any(p.requires_grad for n, p in multi.named_parameters() if "lora_" not in n)
    with pytest.raises(UserError, match="0..2"), route(multi, torch.tensor([0, 3, 1, 1])):
        pass
    with route(multi, torch.tensor([0, 1])), pytest.raises(UserError, match="batch of 4"):
        multi(x)


def test_set_adapter_rejects_an_adapter_that_does_not_fit():
    layer = MultiLoRALinear(torch.nn.Linear(6, 4), n_adapters=2, rank=2, alpha=2.0)
    with pytest.raises(UserError, match="does not fit"):
        layer.set_adapter(0, LoRALinear(torch.nn.Linear(6, 4), rank=3, alpha=3.0))
