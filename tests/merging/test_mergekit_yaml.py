"""mergekit YAML configurations run by ``clpeft merge`` (clpeft/merging/mergekit_yaml.py).

Inputs: the tiny random Llama of tests/llm/tiny_llama.py (hidden 32, 2 layers) and two
fine-tunes of it (every parameter moved by Gaussian noise of 0.01, each its own seed), saved by
transformers. Outputs are checked three ways: ``AutoModelForCausalLM`` and ``AutoTokenizer`` load
the directory; its tensors equal clpeft's in-memory merge with the translated parameters
(per-tensor ones computed here by hand: filters, gradients, slices); and, where mergekit is
installed, they equal ``mergekit.merge.run_merge`` on the same YAML (float32: rtol 1e-5 / atol
1e-6, the same arithmetic in another order; bf16: one bf16 step, for the methods mergekit
computes in float32).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from clpeft.errors import UserError
from clpeft.merging import get_method, merge
from clpeft.merging.mergekit_yaml import METHODS, plan_mergekit, run_mergekit
from clpeft.tools import merge_cli as cli


def _tiny_llama():
    spec = importlib.util.spec_from_file_location("tiny_llama", Path(__file__).parents[1] / "llm" / "tiny_llama.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def llamas(tmp_path_factory):
    """The tiny Llama (with its tokenizer) and two fine-tunes of it, as transformers directories."""
    root = tmp_path_factory.mktemp("llamas")
    _tiny_llama().save_tiny_llama(root / "base")
    base = load_file(root / "base" / "model.safetensors")
    for k in range(2):
        generator = torch.Generator().manual_seed(k + 1)
        (root / f"ft{k}").mkdir()
        tuned = {n: t + 0.01 * torch.randn(t.shape, generator=generator) for n, t in base.items()}
        save_file(tuned, root / f"ft{k}" / "model.safetensors", metadata={"format": "pt"})
        shutil.copy(root / "base" / "config.json", root / f"ft{k}" / "config.json")
    return root


def weights(directory: Path) -> dict[str, torch.Tensor]:
    index = directory / "model.safetensors.index.json"
    files = dict.fromkeys(json.loads(index.read_text())["weight_map"].values()) if index.exists() else ["model.safetensors"]
    out = {}
    for file in files:
        out |= load_file(directory / file)
    return out


def write_yaml(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config))
    return path


def run_cli(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    cli.configure_parser(parser)
    return cli.run(parser.parse_args(list(argv)))


def ties_config(root: Path) -> dict:
    return {
        "merge_method": "ties",
        "base_model": str(root / "base"),
        "models": [
            {"model": str(root / "base")},
            {"model": str(root / "ft0"), "parameters": {"weight": 1.0, "density": 0.5}},
            {"model": str(root / "ft1"), "parameters": {"weight": 1.0, "density": 0.5}},
        ],
        "parameters": {"normalize": True, "lambda": 0.8},
        "dtype": "bfloat16",
    }


def test_ties_yaml_writes_a_loadable_transformers_directory(tmp_path, llamas, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path / "merged"
    assert run_cli(str(write_yaml(tmp_path / "ties.yml", ties_config(llamas))), "--out", str(out), "--shard-size", "20KB") == 0
    assert "with ties (clpeft ties)" in capsys.readouterr().out
    assert len(list(out.glob("model-*.safetensors"))) > 2 and (out / "model.safetensors.index.json").is_file()
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert yaml.safe_load((out / "mergekit_config.yml").read_text())["merge_method"] == "ties"
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert (
        model.dtype == torch.bfloat16 and tokenizer("ab")["input_ids"] == AutoTokenizer.from_pretrained(llamas / "base")("ab")["input_ids"]
    )
    base, finetuned = weights(llamas / "base"), [weights(llamas / f"ft{k}") for k in range(2)]
    expected = merge(base, finetuned, "ties", density=0.5, scale=0.8, trim="topk", trim_scope="tensor", disjoint="mean")
    loaded = model.state_dict()
    for name, tensor in expected.items():
        assert torch.equal(loaded[name], tensor.to(torch.bfloat16)), name
    with torch.no_grad():
        assert torch.isfinite(model(torch.tensor([[5, 6, 7]])).logits).all()


def test_filters_and_gradients_resolve_per_tensor(tmp_path, llamas):
    """slerp's t: a gradient [0, 1] over the 2 layers for self_attn, 0.3 elsewhere (mergekit's
    t = layer / (L - 1), t = 0 outside the layers)."""
    config = {
        "merge_method": "slerp",
        "base_model": str(llamas / "base"),
        "models": [{"model": str(llamas / "base")}, {"model": str(llamas / "ft0")}],
        "parameters": {"t": [{"filter": "self_attn", "value": [0.0, 1.0]}, {"value": 0.3}]},
    }
    run_mergekit(write_yaml(tmp_path / "slerp.yml", config), tmp_path / "out", progress="never")
    merged = weights(tmp_path / "out")
    base, tuned = weights(llamas / "base"), weights(llamas / "ft0")
    for name in base:
        t = (1.0 if ".layers.1." in name else 0.0) if "self_attn" in name else 0.3
        expected = merge({name: base[name]}, [{name: tuned[name]}], "slerp", t=t)[name]
        assert torch.equal(merged[name], expected), name
    assert torch.equal(merged["model.layers.0.self_attn.q_proj.weight"], base["model.layers.0.self_attn.q_proj.weight"])


def test_slices_over_layer_ranges_equal_the_models_form(tmp_path, llamas):
    """Two slices [0, 1) and [1, 2) with per-slice t equal one models: config with those t per layer
    (the final norm and lm_head take the last slice's t, the embeddings the first's, as in mergekit)."""
    sources = [{"model": str(llamas / "base")}, {"model": str(llamas / "ft0")}]
    sliced = {
        "merge_method": "slerp",
        "base_model": str(llamas / "base"),
        "slices": [
            {"sources": [s | {"layer_range": [0, 1]} for s in sources], "parameters": {"t": 0.2}},
            {"sources": [s | {"layer_range": [1, 2]} for s in sources], "parameters": {"t": 0.9}},
        ],
    }
    per_layer = {
        "merge_method": "slerp",
        "base_model": str(llamas / "base"),
        "models": sources,
        "parameters": {
            "t": [
                {"filter": "layers.0.", "value": 0.2},
                {"filter": "layers.1.", "value": 0.9},
                {"filter": "model.norm", "value": 0.9},
                {"filter": "lm_head", "value": 0.9},
                {"value": 0.2},
            ]
        },
    }
    run_mergekit(write_yaml(tmp_path / "sliced.yml", sliced), tmp_path / "sliced", progress="never")
    run_mergekit(write_yaml(tmp_path / "layers.yml", per_layer), tmp_path / "layers", progress="never")
    a, b = weights(tmp_path / "sliced"), weights(tmp_path / "layers")
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_method_translations(llamas):
    root = str(llamas)
    models = [{"model": f"{root}/ft0", "parameters": {"weight": 2.0}}, {"model": f"{root}/ft1", "parameters": {"weight": 1.0}}]
    cases = {
        "task_arithmetic": ({"normalize": True}, {"scale": 1.0, "weights": [2 / 3, 1 / 3]}),
        "dare_ties": ({"density": 0.4}, {"density": 0.4, "epsilon": 0.0, "rescale": "l1", "consensus": "ties", "disjoint": "sum"}),
        "dare_linear": ({"density": 0.4, "rescale": False}, {"epsilon": 0.0, "rescale": "none", "consensus": "sum"}),
        "breadcrumbs_ties": ({"density": 0.8}, {"gamma": 0.01, "consensus": "ties", "rescale": False, "disjoint": "sum"}),
        "della": ({"density": 0.5, "epsilon": 0.1}, {"epsilon": 0.1, "rescale": "l1", "disjoint": "mean"}),
        "multislerp": ({}, {"weights": [2.0, 1.0], "origin": "base"}),
        "karcher": ({"max_iter": 5}, {"max_iter": 5, "include_base": True}),
    }
    for name, (given, expected) in cases.items():
        listed = [{"model": m["model"]} for m in models] if name == "karcher" else models  # karcher has no weights
        plan = plan_mergekit({"merge_method": name, "base_model": f"{root}/base", "models": listed, "parameters": given})
        params = plan.parameters_of("model.layers.0.mlp.up_proj.weight")
        assert plan.method == METHODS[name].clpeft and params.items() >= expected.items(), name
    linear = plan_mergekit({"merge_method": "linear", "models": models})  # no base: the first model is the base, weighted
    assert linear.base == llamas / "ft0" and linear.models == [llamas / "ft1"]
    assert linear.parameters_of("x") == {"weights": [1.0], "base_weight": 2.0, "normalize": True}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"tokenizer": {"source": "union"}}, "mergekit key 'tokenizer' is not supported"),
        ({"modules": {}}, "mergekit key 'modules' is not supported"),
        ({"frobnicate": 1}, "mergekit key 'frobnicate' is not supported"),
        ({"merge_method": "passthrough"}, "merge_method 'passthrough' is not supported"),
        ({"parameters": {"normalize": True, "k": 3}}, "mergekit parameter 'k' is not supported for merge_method ties"),
        ({"base_model": None}, "ties needs a base_model"),
        ({"tokenizer_source": "union"}, "tokenizer_source: union"),
        ({"dtype": "int4"}, "dtype must be one of"),
        ({"base_model": "meta-llama/Llama-2-7b-hf"}, "is not a local directory: clpeft merges local checkpoints only"),
    ],
)
def test_unsupported_keys_are_one_line_errors(tmp_path, llamas, change, message):
    config = {**ties_config(llamas), **change}
    with pytest.raises(UserError, match=message) as error:
        run_cli(str(write_yaml(tmp_path / "bad.yml", config)), "--out", str(tmp_path / "out"))
    assert "\n" not in str(error.value)


def test_per_model_density_must_agree(tmp_path, llamas):
    config = ties_config(llamas)
    config["models"][2]["parameters"]["density"] = 0.7
    with pytest.raises(UserError, match=r"one density to every model, got \[0.5, 0.7\]"):
        run_mergekit(write_yaml(tmp_path / "a.yml", config), tmp_path / "a")
    with pytest.raises(UserError, match="--method does not apply to a mergekit YAML"):
        run_cli(str(write_yaml(tmp_path / "c.yml", ties_config(llamas))), "--out", str(tmp_path / "c"), "--method", "ties")


def test_main_cli_exits_2_on_an_unsupported_key(tmp_path, llamas, capsys):
    from clpeft.cli import main

    config = {**ties_config(llamas), "chat_template": "chatml"}
    assert main(["merge", str(write_yaml(tmp_path / "bad.yml", config)), "--out", str(tmp_path / "out")]) == 2
    assert "chat_template" in capsys.readouterr().err


# ------------------------------------------------------------------ against mergekit

MERGEKIT_CASES = {
    "linear": ({"normalize": True}, [{"weight": 0.3}, {"weight": 0.7}], False),
    "task_arithmetic": ({"lambda": 0.7}, [{"weight": 0.5}, {"weight": 1.0}], True),
    "ties": ({"lambda": 1.2}, [{"weight": 1.0, "density": 0.4}, {"weight": 1.0, "density": 0.4}], True),
    "breadcrumbs": ({}, [{"weight": 0.6, "density": 0.8, "gamma": 0.05}, {"weight": 0.9, "density": 0.8, "gamma": 0.05}], True),
    "breadcrumbs_ties": ({}, [{"weight": 1.0, "density": 0.7}, {"weight": 1.0, "density": 0.7}], True),
    "slerp": ({"t": [{"filter": "mlp", "value": [0.1, 0.9]}, {"value": [0.2, 0.7]}]}, None, True),
    "multislerp": ({}, [{"weight": 1.0}, {"weight": 2.0}], True),
    "nuslerp": ({"nuslerp_flatten": False}, [{"weight": 1.0}, {"weight": 3.0}], True),
    "karcher": ({"max_iter": 20}, [{}, {}], False),
    "model_stock": ({}, [{}, {}], True),
    "sce": ({"select_topk": 0.5}, [{}, {}], True),
}


def mergekit_config(root: Path, method: str, dtype: str) -> dict:
    parameters, per_model, with_base = MERGEKIT_CASES[method]
    if per_model is None:  # slerp: the base and one model
        models = [{"model": str(root / "base")}, {"model": str(root / "ft0")}]
    else:
        models = [{"model": str(root / f"ft{k}")} | ({"parameters": p} if p else {}) for k, p in enumerate(per_model)]
    config = {"merge_method": method, "models": models, "dtype": dtype}
    if parameters:
        config["parameters"] = parameters
    if with_base:
        config["base_model"] = str(root / "base")
    return config


def run_mergekit_reference(config: dict, out: Path) -> dict[str, torch.Tensor]:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    options = MergeOptions(cuda=False, copy_tokenizer=False, lazy_unpickle=False, quiet=True, random_seed=0)
    run_merge(MergeConfiguration.model_validate(config), str(out), options=options)
    return weights(out)


@pytest.fixture(scope="module")
def bf16_llamas(tmp_path_factory, llamas):
    """The same three models saved in bf16 (as LLMs ship), so both tools read the same inputs."""
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("bf16_llamas")
    for name in ("base", "ft0", "ft1"):
        AutoModelForCausalLM.from_pretrained(llamas / name, dtype=torch.bfloat16).save_pretrained(root / name)
    return root


@pytest.mark.parametrize(("method", "dtype"), [*((m, "float32") for m in MERGEKIT_CASES), ("linear", "bfloat16"), ("slerp", "bfloat16")])
def test_equals_mergekit_run_merge(tmp_path, request, method, dtype):
    pytest.importorskip("mergekit", reason="mergekit is not installed: pip install 'mergekit>=0.1.5'")
    root = request.getfixturevalue("llamas" if dtype == "float32" else "bf16_llamas")
    config = mergekit_config(root, method, dtype)
    theirs = run_mergekit_reference(config, tmp_path / "mergekit")
    run_mergekit(write_yaml(tmp_path / "config.yml", config), tmp_path / "clpeft", progress="never")
    ours = weights(tmp_path / "clpeft")
    assert ours.keys() == theirs.keys()
    tolerance = {"rtol": 1e-5, "atol": 1e-6} if dtype == "float32" else {"rtol": 2**-7, "atol": 1e-6}  # bf16: one step
    for name in ours:
        assert ours[name].dtype == theirs[name].dtype, name
        torch.testing.assert_close(ours[name].float(), theirs[name].float(), **tolerance, msg=f"{method} {name}")


# frankenmerge_*.yml slice 32-layer models: tests/merging/test_mergekit_slices.py runs them against mergekit
EXAMPLES = sorted(
    p for p in (Path(__file__).resolve().parents[2] / "configs" / "merge").glob("*.yml") if not p.name.startswith("frankenmerge_")
)


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_configs_translate(tmp_path, llamas, monkeypatch, path):
    """configs/merge/*.yml name models/base, models/finetune_a, models/finetune_b relative to the
    working directory (as mergekit does); here they are the tiny Llamas."""
    for name, target in {"base": "base", "finetune_a": "ft0", "finetune_b": "ft1"}.items():
        (tmp_path / "models").mkdir(exist_ok=True)
        (tmp_path / "models" / name).symlink_to(llamas / target)
    monkeypatch.chdir(tmp_path)
    plan = plan_mergekit(yaml.safe_load(path.read_text()))
    method = get_method(plan.method)
    for tensor in ("model.embed_tokens.weight", "model.layers.1.self_attn.q_proj.weight", "model.layers.0.mlp.up_proj.weight"):
        method.validate(plan.parameters_of(tensor))
