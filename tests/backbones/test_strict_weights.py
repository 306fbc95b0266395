"""``backbone.weights`` loads strictly: a file that does not fit is one line and exit 2, never a random backbone.

Accepted: a backbone's own state dict (timm's names for ``timm``, its classifier left out), a
clpeft run directory or its ``model.safetensors``, and a ``clpeft merge`` output of those. The
end-to-end test evaluates a merged model with ``clpeft run CONFIG --set backbone.weights=...``.
"""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import yaml
from safetensors.torch import load_file, save_file

from clpeft import config
from clpeft.backbones import offline_weights as ow
from clpeft.backbones.cnn import CNNBackbone
from clpeft.backbones.mlp import MLPBackbone
from clpeft.backbones.text import TextEncoder, packaged_path
from clpeft.backbones.timm_backbone import TimmBackbone
from clpeft.cli import main
from clpeft.engine import Engine
from clpeft.errors import UserError
from clpeft.merging import merge_files

VIT = {"model": "test_vit", "img_size": 32}
DIGITS = {
    "seed": 0,
    "scenario": {"name": "class_incremental", "dataset": "sklearn_digits", "n_experiences": 2},
    "backbone": {"name": "mlp", "hidden": [32]},
    "strategy": {"name": "finetune"},
    "train": {"epochs": 1, "batch_size": 32, "lr": 0.05},
    "eval": {"baseline": False},
    "logging": {"tensorboard": False, "progress": "never"},
}


def _vit_state(num_classes: int = 0) -> dict[str, torch.Tensor]:
    torch.manual_seed(1)
    return timm.create_model("test_vit", img_size=32, num_classes=num_classes).state_dict()


def _run_cli(tmp_path, cfg: dict, *overrides: str) -> tuple[int, Path]:
    """``clpeft run`` on ``cfg`` with ``--set`` overrides: (exit code, run directory)."""
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out = tmp_path / f"out{len(list(tmp_path.glob('out*')))}"
    sets = [arg for o in overrides for arg in ("--set", o)]
    return main(["run", str(path), "--out", str(out), "--device", "cpu", *sets]), out


class _PlantedCode:
    """Pickles as a call to ``open(marker, 'w')``: creates the marker if the file is ever unpickled."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def _foreign_prefix(tmp_path):
    save_file({f"encoder.{k}": v for k, v in _vit_state().items()}, tmp_path / "w.safetensors")
    return tmp_path / "w.safetensors", ["does not fit the backbone", "extra prefix 'encoder.'"]


def _missing_key(tmp_path):
    state = _vit_state()
    del state["blocks.0.attn.qkv.weight"]
    save_file(state, tmp_path / "w.safetensors")
    return tmp_path / "w.safetensors", ["1 of the backbone's", "are not in it (blocks.0.attn.qkv.weight)"]


def _extra_key(tmp_path):
    torch.save({**_vit_state(), "blocks.0.attn.scale_extra": torch.ones(3)}, tmp_path / "w.pth")
    return tmp_path / "w.pth", ["1 of its", "belong to no backbone tensor (blocks.0.attn.scale_extra)"]


def _wrong_shape(tmp_path):
    state = _vit_state()
    state["blocks.0.mlp.fc1.weight"] = state["blocks.0.mlp.fc1.weight"].t().contiguous()
    save_file(state, tmp_path / "w.safetensors")
    shape = tuple(_vit_state()["blocks.0.mlp.fc1.weight"].shape)
    return tmp_path / "w.safetensors", [f"'blocks.0.mlp.fc1.weight' has shape {shape[::-1]} in the file but {shape}"]


def _run_file_missing_key(tmp_path):
    state = {f"backbone.net.{k}": v for k, v in _vit_state().items() if k != "norm.weight"}
    save_file({**state, "head.weight": torch.zeros(10, 64)}, tmp_path / "model.safetensors")
    return tmp_path / "model.safetensors", ["are not in it (backbone.net.norm.weight)"]


def _run_of_another_backbone(tmp_path):
    mlp = {f"backbone.{k}": v for k, v in MLPBackbone((1, 8, 8), hidden=[16]).state_dict().items()}
    save_file({**mlp, "head.weight": torch.zeros(10, 16)}, tmp_path / "model.safetensors")
    return tmp_path / "model.safetensors", ["belong to no backbone tensor (backbone.net.0.bias, backbone.net.0.weight)"]


def _text_file(tmp_path):
    (tmp_path / "w.pth").write_text("not a checkpoint\n")
    return tmp_path / "w.pth", ["is not a readable checkpoint"]


def _truncated(tmp_path):
    save_file(_vit_state(), tmp_path / "full.safetensors")
    data = (tmp_path / "full.safetensors").read_bytes()
    (tmp_path / "w.safetensors").write_bytes(data[: len(data) // 2])
    return tmp_path / "w.safetensors", ["is not a readable checkpoint", "SafetensorError"]


def _planted_pickle(tmp_path):
    torch.save({"pos_embed": _PlantedCode(tmp_path / "marker")}, tmp_path / "w.pth")
    return tmp_path / "w.pth", ["asks to load 'io.open'", "never runs code"]


@pytest.mark.parametrize(
    "make",
    [
        _foreign_prefix,
        _missing_key,
        _extra_key,
        _wrong_shape,
        _run_file_missing_key,
        _run_of_another_backbone,
        _text_file,
        _truncated,
        _planted_pickle,
    ],
)
def test_a_file_that_does_not_fit_is_one_line_and_exit_2(make, tmp_path, capsys):
    file, fragments = make(tmp_path)
    cfg = {**copy.deepcopy(DIGITS), "backbone": {"name": "timm", **VIT}, "strategy": {"name": "simplecil"}}
    code, out = _run_cli(tmp_path, cfg, f"backbone.weights={file}")
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("clpeft: error: backbone.weights: ") and str(file) in err, err
    for fragment in fragments:
        assert fragment in err
    assert not (out / "metrics.json").exists() and not (tmp_path / "marker").exists()


def _equal(module: torch.nn.Module, tensors: dict[str, torch.Tensor], prefix: str = "") -> None:
    own = module.state_dict()
    assert own.keys() == {k[len(prefix) :] for k in tensors if k.startswith(prefix)}
    for name, value in own.items():
        assert torch.equal(value, tensors[prefix + name]), name


def test_timm_checkpoint_loads_without_its_classifier_and_unwrapped(tmp_path):
    state = _vit_state(num_classes=10)
    assert "head.weight" in state
    save_file(state, tmp_path / "w.safetensors")
    _equal(
        TimmBackbone((1, 8, 8), **VIT, weights=str(tmp_path / "w.safetensors")).net,
        {k: v for k, v in state.items() if not k.startswith("head.")},
    )
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "train.pth")
    _equal(
        TimmBackbone((1, 8, 8), **VIT, weights=str(tmp_path / "train.pth")).net,
        {k: v for k, v in state.items() if not k.startswith("head.")},
    )


def test_timm_checkpoint_position_embedding_follows_img_size(tmp_path):
    state = _vit_state()
    save_file(state, tmp_path / "w.safetensors")
    bb = TimmBackbone((1, 8, 8), model="test_vit", img_size=48, weights=str(tmp_path / "w.safetensors"))
    assert bb.net.pos_embed.shape[1] == 1 + 9 != state["pos_embed"].shape[1]
    _equal(bb.net, {k: v for k, v in state.items() if k != "pos_embed"} | {"pos_embed": bb.net.pos_embed})


@pytest.mark.parametrize("split_qkv", [False, True])
def test_run_file_and_directory_load_bitwise(split_qkv, tmp_path):
    torch.manual_seed(2)
    trained = TimmBackbone((1, 8, 8), **VIT, split_qkv=split_qkv, freeze=False)
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(torch.randn_like(p))
    run = {f"backbone.{k}": v for k, v in trained.state_dict().items()}
    save_file({**run, "head.weight": torch.ones(10, 64), "prompt_pool.keys": torch.ones(4, 64)}, tmp_path / "model.safetensors")
    for weights in (tmp_path / "model.safetensors", tmp_path):
        loaded = TimmBackbone((1, 8, 8), **VIT, split_qkv=split_qkv, weights=str(weights))
        _equal(loaded, run, "backbone.")
    if split_qkv:  # a split run does not fit an unsplit backbone: refused, never half-loaded
        with pytest.raises(UserError, match=r"backbone.net.blocks.0.attn.qkv.weight"):
            TimmBackbone((1, 8, 8), **VIT, weights=str(tmp_path))


def test_run_directory_without_weights_and_missing_file_are_refused(tmp_path):
    with pytest.raises(UserError, match=r"holds no model.safetensors"):
        MLPBackbone((1, 8, 8), hidden=[8], weights=str(tmp_path))
    with pytest.raises(UserError, match=r"nope.safetensors not found"):
        MLPBackbone((1, 8, 8), hidden=[8], weights=str(tmp_path / "nope.safetensors"))


def test_cnn_loads_buffers_and_refuses_a_missing_one(tmp_path):
    source = CNNBackbone((1, 8, 8), widths=[4, 8])
    source(torch.randint(0, 256, (4, 1, 8, 8), dtype=torch.uint8))  # training mode: running statistics move
    state = source.state_dict()
    torch.save(state, tmp_path / "cnn.pt")
    _equal(CNNBackbone((1, 8, 8), widths=[4, 8], weights=str(tmp_path / "cnn.pt")), state)
    del state["stem.1.running_var"]
    torch.save(state, tmp_path / "cnn.pt")
    with pytest.raises(UserError, match=r"1 of the backbone's \d+ tensors are not in it \(stem.1.running_var\)"):
        CNNBackbone((1, 8, 8), widths=[4, 8], weights=str(tmp_path / "cnn.pt"))


def test_offline_model_refuses_a_cache_file_that_does_not_fit(tmp_path, monkeypatch):
    state = timm.create_model("tf_efficientnet_lite0").state_dict()
    del state["conv_head.weight"]
    save_file(state, tmp_path / "lite0.safetensors")
    monkeypatch.setattr(ow, "offline_weights_file", lambda name, cache_dir=None: tmp_path / "lite0.safetensors")
    with pytest.raises(UserError, match=r"lite0.safetensors does not fit .*\(conv_head.weight\); delete the file"):
        ow.create_offline_model("efficientnet-lite0")


def _tiny_bert_dir(tmp_path, cls_name: str = "BertModel"):
    import transformers

    tokenizer_dir = packaged_path("minilm-l6")
    directory = tmp_path / "bert"
    directory.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json"):
        shutil.copy(tokenizer_dir / name, directory / name)
    cfg = transformers.BertConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    getattr(transformers, cls_name)(cfg).save_pretrained(directory)
    return directory


@pytest.mark.parametrize(
    "change, fragment",
    [
        ("missing", r"1 of BertModel's tensors are not in it \(encoder.layer.0.attention.self.query.weight\)"),
        ("extra", r"1 of its tensors belong to no parameter \(encoder.layer.0.extra\)"),
        (
            "shape",
            r"1 of its tensors have another shape than the model's "
            r"\(encoder.layer.0.attention.self.query.weight \(16, 8\) vs \(16, 16\)\)",
        ),
    ],
)
def test_text_directory_that_leaves_a_parameter_random_is_refused(change, fragment, tmp_path):
    directory = _tiny_bert_dir(tmp_path)
    state = load_file(directory / "model.safetensors")
    if change == "missing":
        del state["encoder.layer.0.attention.self.query.weight"]
    elif change == "shape":
        state["encoder.layer.0.attention.self.query.weight"] = torch.zeros(16, 8)
    else:
        state["encoder.layer.0.extra"] = torch.ones(2)
    save_file(state, directory / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(UserError, match=fragment):
        TextEncoder(weights=str(directory))


def test_text_directory_of_a_task_model_loads_without_its_head(tmp_path):
    directory = _tiny_bert_dir(tmp_path, "BertForSequenceClassification")
    state = load_file(directory / "model.safetensors")
    encoder = TextEncoder(weights=str(directory))
    _equal(encoder.net, {k.removeprefix("bert."): v for k, v in state.items() if not k.startswith("classifier.")})


def _digits_arrays():
    """sklearn's digits split as the dataset documents it (70/30, stratified, seed 0), rebuilt here."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    images = torch.from_numpy(np.rint(d.images * (255.0 / 16.0)).astype(np.uint8))
    tr, te = train_test_split(np.arange(len(d.target)), test_size=0.3, random_state=0, stratify=d.target)
    targets = torch.from_numpy(d.target)
    return images[tr], targets[tr], images[te], targets[te]


def _prototype_accuracy(weight: torch.Tensor, bias: torch.Tensor) -> float:
    """SimpleCIL by hand on a one-layer MLP: class-mean features, cosine nearest prototype."""
    x_train, y_train, x_test, y_test = _digits_arrays()

    def features(x):
        return torch.relu(x.flatten(1).float() / 255.0 @ weight.t() + bias)

    f = features(x_train)
    prototypes = torch.stack([f[y_train == c].mean(0) for c in range(10)])
    cos = torch.nn.functional.normalize(features(x_test), dim=1) @ torch.nn.functional.normalize(prototypes, dim=1).t()
    return (cos.argmax(1) == y_test).double().mean().item()


def test_evaluate_a_merged_model(tmp_path, capsys):
    """Two fine-tunes merged over their base, then evaluated as the README says: exact weights, exact accuracy."""
    runs = {}
    for name, change in [
        ("base", {"strategy": {"name": "simplecil"}}),  # untrained: the fine-tunes' start
        ("a", {}),
        ("b", {"train": {**DIGITS["train"], "lr": 0.1}}),
    ]:
        runs[name] = tmp_path / name
        Engine(config.resolve({**copy.deepcopy(DIGITS), **change}), runs[name], device="cpu").run()
    merged_file = tmp_path / "merged.safetensors"
    merge_files(
        runs["base"],
        [runs["a"], runs["b"]],
        merged_file,
        "task_arithmetic",
        scale=0.5,
        rules={"skip": ["head.*", "stats.*"]},
        progress="never",
    )
    merged = load_file(merged_file)
    assert merged.keys() == {"backbone.net.0.weight", "backbone.net.0.bias"}
    start, a = load_file(runs["base"] / "model.safetensors"), load_file(runs["a"] / "model.safetensors")
    assert not torch.equal(merged["backbone.net.0.weight"], start["backbone.net.0.weight"])
    assert not torch.equal(merged["backbone.net.0.weight"], a["backbone.net.0.weight"])

    _equal(MLPBackbone((1, 8, 8), hidden=[32], weights=str(merged_file)), merged, "backbone.")
    cfg = {**copy.deepcopy(DIGITS), "scenario": {**DIGITS["scenario"], "n_experiences": 1}, "strategy": {"name": "simplecil"}}
    code, out = _run_cli(tmp_path, cfg, f"backbone.weights={merged_file}")
    assert code == 0, capsys.readouterr().err
    exported = load_file(out / "model.safetensors")
    assert all(torch.equal(exported[k], v) for k, v in merged.items())
    acc = json.loads((out / "metrics.json").read_text())["acc_matrix"]
    expected = _prototype_accuracy(merged["backbone.net.0.weight"], merged["backbone.net.0.bias"])
    assert acc == [[pytest.approx(expected, abs=1e-12)]]
    assert expected != _prototype_accuracy(start["backbone.net.0.weight"], start["backbone.net.0.bias"])


def test_a_lora_run_is_refused_with_the_reason(tmp_path):
    lora = {
        "backbone.net.0.base_layer.weight": torch.zeros(8, 64),
        "backbone.net.0.base_layer.bias": torch.zeros(8),
        "backbone.net.0.lora_A": torch.zeros(2, 64),
        "backbone.net.0.lora_B": torch.zeros(8, 2),
    }
    save_file(lora, tmp_path / "model.safetensors")
    with pytest.raises(UserError, match=r"4 of its 4 tensors belong to no backbone tensor .*LoRA tensors"):
        MLPBackbone((1, 8, 8), hidden=[8], weights=str(tmp_path))
