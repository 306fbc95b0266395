"""LoRA adapters merge from their factors, in clpeft's format and in peft's."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from clpeft.errors import UserError
from clpeft.merging import LoraAdapter, get_method, merge, merge_files
from clpeft.merging.engine import _tensor_seed

LAYERS = {"blocks.0.attn.qkv": (48, 16), "blocks.1.mlp.fc1": (64, 16), "blocks.1.mlp.fc2": (16, 64)}


def clpeft_adapter(base: dict[str, torch.Tensor], rank: int, seed: int, alpha: float = 8.0) -> dict[str, torch.Tensor]:
    """Factors for some of ``LAYERS`` (each adapter adapts a different subset), clpeft naming."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for i, (module, (out, inp)) in enumerate(LAYERS.items()):
        if (i + seed) % 3 == 2:
            continue  # this adapter leaves the layer alone
        assert base[f"{module}.weight"].shape == (out, inp)
        tensors[f"{module}.lora_A"] = torch.randn(rank, inp, generator=generator)
        tensors[f"{module}.lora_B"] = torch.randn(out, rank, generator=generator)
    tensors["blocks.0.attn.qkv.lora_alpha"] = torch.tensor(alpha)
    return tensors


@pytest.fixture
def adapters(models):
    base, _ = models
    return base, [LoraAdapter.from_state_dict(clpeft_adapter(base, r, seed), alpha=4.0) for seed, r in enumerate((2, 4, 3))]


def dense(base, adapter: LoraAdapter) -> dict[str, torch.Tensor]:
    """The full fine-tune an adapter stands for: base + s B A on every adapted layer."""
    return {
        name: t + adapter.delta(name, device=t.device, dtype=t.dtype).view(t.shape) if name in adapter.layers else t
        for name, t in base.items()
    }


def test_scaling_per_layer(adapters):
    _, (first, *_) = adapters
    assert first.layers["blocks.0.attn.qkv.weight"].scaling == 8.0 / 2  # per-module lora_alpha tensor
    assert first.layers["blocks.1.mlp.fc1.weight"].scaling == 4.0 / 2  # the alpha argument


@pytest.mark.parametrize("method", ["task_arithmetic", "mean"])
def test_linear_merge_from_factors_equals_merging_the_dense_deltas(adapters, method, monkeypatch):
    base, loras = adapters
    expected = merge(base, [dense(base, a) for a in loras], method, **({"scale": 0.7} if method == "task_arithmetic" else {}))
    monkeypatch.setattr(LoraAdapter, "delta", lambda *a, **k: pytest.fail("formed a dense delta per adapter"))
    merged = merge(base, loras, method, **({"scale": 0.7} if method == "task_arithmetic" else {}))
    assert merged.keys() == expected.keys()
    for name in base:
        torch.testing.assert_close(merged[name], expected[name], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    ("method", "params"),
    [("ties", {"density": 0.3, "trim_scope": "tensor"}), ("dare", {"drop_rate": 0.5, "consensus": "ties"})],
)
def test_ties_and_dare_on_adapters_use_each_layers_dense_deltas(adapters, method, params):
    base, loras = adapters
    merged = merge(base, loras, method, seed=5, **params)
    name = "blocks.1.mlp.fc1.weight"
    deltas = torch.stack(
        [a.delta(name, device=torch.device("cpu"), dtype=torch.float32) if name in a.layers else torch.zeros(64 * 16) for a in loras]
    )
    spec = get_method(method)
    generator = {"generator": torch.Generator().manual_seed(_tensor_seed(5, name))} if spec.uses_generator else {}
    expected = base[name] + spec.fn(deltas, **params, **generator).view(64, 16)
    assert torch.equal(merged[name], expected)
    assert torch.equal(merged["head.weight"], base["head.weight"])  # not adapted: the base's


def test_streaming_adapters_from_files_equals_in_memory(tmp_path, adapters, models):
    base, _ = models
    save_file(base, tmp_path / "base.safetensors")
    paths = []
    for seed, rank in enumerate((2, 4, 3)):
        paths.append(tmp_path / f"adapter_{seed}.safetensors")
        save_file(clpeft_adapter(base, rank, seed), paths[-1], metadata={"lora_alpha": "4.0"})
    merge_files(tmp_path / "base.safetensors", paths, tmp_path / "out.safetensors", "task_arithmetic", scale=0.5)
    expected = merge(base, adapters[1], "task_arithmetic", scale=0.5)
    streamed = load_file(tmp_path / "out.safetensors")
    assert all(torch.equal(streamed[n], expected[n]) for n in expected)


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(16, 32)
        self.fc2 = nn.Linear(32, 8)
        self.conv = nn.Conv2d(3, 4, 3)


@pytest.mark.parametrize("use_rslora", [False, True])
def test_peft_adapter_equals_peft_merge_and_unload(tmp_path, use_rslora):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = Tiny()
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["fc1", "fc2", "conv"], rank_pattern={"fc2": 2}, use_rslora=use_rslora)
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_" in name:
                p.normal_()
    peft_model.save_pretrained(tmp_path / "adapter")
    expected = peft_model.merge_and_unload().state_dict()
    save_file(base, tmp_path / "base.safetensors")

    merge_files(
        tmp_path / "base.safetensors", [tmp_path / "adapter"], tmp_path / "out.safetensors", "task_arithmetic", scale=1.0
    )  # one adapter, added whole: merge_and_unload
    merged = load_file(tmp_path / "out.safetensors")
    assert merged.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(merged[name], expected[name], rtol=1e-5, atol=1e-5)
    assert not torch.equal(merged["conv.weight"], base["conv.weight"])


def test_adapter_for_another_model_is_rejected(models):
    base, _ = models
    wrong = {"blocks.0.attn.qkv.lora_A": torch.randn(2, 17), "blocks.0.attn.qkv.lora_B": torch.randn(48, 2)}
    with pytest.raises(UserError, match=r"'blocks.0.attn.qkv.weight' has shape \[48, 17\]"):
        merge(base, [LoraAdapter.from_state_dict(wrong, alpha=1.0)], "task_arithmetic")


def test_unsupported_and_incomplete_adapters(tmp_path, models):
    base, finetuned = models
    with pytest.raises(UserError, match="no lora_B factor"):
        LoraAdapter.from_state_dict({"fc.lora_A": torch.randn(2, 4)}, alpha=1.0)
    with pytest.raises(UserError, match="has no alpha"):
        LoraAdapter.from_state_dict({"fc.lora_A": torch.randn(2, 4), "fc.lora_B": torch.randn(3, 2)})
    (tmp_path / "dora").mkdir()
    (tmp_path / "dora" / "adapter_config.json").write_text(json.dumps({"r": 2, "lora_alpha": 2, "use_dora": True}))
    save_file(
        {
            "base_model.model.fc.lora_A.weight": torch.randn(2, 4),
            "base_model.model.fc.lora_B.weight": torch.randn(3, 2),
        },
        tmp_path / "dora" / "adapter_model.safetensors",
    )
    save_file(base, tmp_path / "base.safetensors")
    with pytest.raises(UserError, match="DoRA"):
        merge_files(tmp_path / "base.safetensors", [tmp_path / "dora"], tmp_path / "out.safetensors", "task_arithmetic")
    adapter = LoraAdapter.from_state_dict(clpeft_adapter(base, 2, 0), alpha=1.0)
    with pytest.raises(UserError, match="cannot mix LoRA adapters"):
        merge(base, [adapter, finetuned[0]], "task_arithmetic")
    assert not (tmp_path / "out.safetensors").exists()


def test_adapters_saved_by_the_lora_component_merge_exactly(tmp_path):
    """The format contract with clpeft.components.lora: grown ranks keep s = alpha / r exact."""
    lora = pytest.importorskip("clpeft.components.lora")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    layers = lora.inject_lora(model, ["0", "2"], rank=2, alpha=4.0)
    layers["0"].grow(3)  # rank 5, same scaling: the saved alpha becomes s * 5
    with torch.no_grad():
        for layer in layers.values():
            layer.lora_B.normal_()
    lora.save_adapters(model, tmp_path / "adapter.safetensors")
    save_file(base, tmp_path / "base.safetensors")
    merge_files(tmp_path / "base.safetensors", [tmp_path / "adapter.safetensors"], tmp_path / "out.safetensors", "mean")
    merged = load_file(tmp_path / "out.safetensors")
    for name, layer in layers.items():
        torch.testing.assert_close(merged[f"{name}.weight"], base[f"{name}.weight"] + layer.delta_weight().detach())
    assert torch.equal(merged["0.bias"], base["0.bias"])
