"""mergekit ``slices:`` and ``passthrough`` run by ``clpeft merge`` (clpeft/merging/slices.py).

Inputs: two different random 4-layer Llamas (hidden 32) with the character tokenizer of
tests/llm/tiny_llama.py, saved by transformers. Each config runs through mergekit's own
``run_merge`` (the reference) and through clpeft; the two output directories must hold the same
tensor names, the same values (bit for bit for passthrough, which only copies and scales; the
existing tolerance of tests/merging/test_mergekit_yaml.py for slerp and linear, computed in
another order), the same ``num_hidden_layers``, and load in ``AutoModelForCausalLM`` with the
same logits.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from clpeft.errors import UserError
from clpeft.merging.mergekit_yaml import run_mergekit
from clpeft.merging.slices import OutputSlice, SliceSource, plan_slices
from clpeft.tools import merge_cli as cli

mergekit = pytest.importorskip("mergekit", reason="mergekit is the reference: pip install 'mergekit>=0.1.5'")

TOKENS = torch.tensor([[5, 6, 7, 8, 9, 10]])


def save_llama(directory: Path, seed: int, layers: int, hidden: int = 32, dtype: torch.dtype = torch.float32) -> None:
    """A random Llama with ``layers`` layers and the tiny Llama's tokenizer, saved in ``dtype``."""
    import importlib.util

    from transformers import LlamaConfig, LlamaForCausalLM

    spec = importlib.util.spec_from_file_location("tiny_llama", Path(__file__).parents[1] / "llm" / "tiny_llama.py")
    tiny = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tiny)
    tokenizer = tiny.char_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    LlamaForCausalLM(config).to(dtype).save_pretrained(directory)
    tokenizer.save_pretrained(directory)


@pytest.fixture(scope="module")
def llamas(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("slice_llamas")
    for seed, name in enumerate(("a", "b")):
        save_llama(root / name, seed, layers=4)
    shutil.copytree(root / "a", root / "c")  # a third model, for a slice with more sources
    return root


def weights(directory: Path) -> dict[str, torch.Tensor]:
    index = directory / "model.safetensors.index.json"
    files = dict.fromkeys(json.loads(index.read_text())["weight_map"].values()) if index.exists() else ["model.safetensors"]
    out = {}
    for file in files:
        out |= load_file(directory / file)
    return out


def reference(config: dict, out: Path) -> Path:
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    options = MergeOptions(cuda=False, copy_tokenizer=False, lazy_unpickle=False, quiet=True, random_seed=0)
    run_merge(MergeConfiguration.model_validate(config), str(out), options=options)
    return out


def logits(directory: Path) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(directory).float()(TOKENS).logits


def assert_same_as_mergekit(config: dict, tmp_path: Path, exact: bool, layers: int, theirs: dict | None = None) -> dict[str, torch.Tensor]:
    """clpeft runs ``config``, mergekit ``theirs`` (default the same) and the outputs must agree."""
    path = tmp_path / "config.yml"
    path.write_text(yaml.safe_dump(config))
    theirs_dir = reference(theirs or config, tmp_path / "mergekit")
    run_mergekit(path, tmp_path / "clpeft", progress="never", shard_size="40KB")
    ours, theirs = weights(tmp_path / "clpeft"), weights(theirs_dir)
    assert sorted(ours) == sorted(theirs)
    for name in ours:
        assert ours[name].dtype == theirs[name].dtype, name
        if exact:
            assert torch.equal(ours[name], theirs[name]), name
        else:
            rtol = 2**-7 if ours[name].dtype == torch.bfloat16 else 1e-5  # bf16: one step (rounded from float32 computed apart)
            torch.testing.assert_close(ours[name], theirs[name], rtol=rtol, atol=1e-6, msg=name)
    config_ours = json.loads((tmp_path / "clpeft" / "config.json").read_text())
    assert config_ours["num_hidden_layers"] == json.loads((theirs_dir / "config.json").read_text())["num_hidden_layers"] == layers
    assert len(list((tmp_path / "clpeft").glob("model-*.safetensors"))) > 1  # written shard by shard
    rtol, atol = (0, 0) if exact else (1e-4, 1e-5) if config_ours.get("dtype") != "bfloat16" else (2e-2, 2e-3)
    torch.testing.assert_close(logits(tmp_path / "clpeft"), logits(theirs_dir), rtol=rtol, atol=atol)
    return ours


def test_interleaved_frankenmerge_of_two_models(tmp_path, llamas):
    """The classic frankenmerge: layers 0-2 of a then 1-3 of b (six layers); the embeddings come
    from the first slice's model, the final norm and lm_head from the last slice's."""
    config = {
        "merge_method": "passthrough",
        "slices": [
            {"sources": [{"model": str(llamas / "a"), "layer_range": [0, 3]}]},
            {"sources": [{"model": str(llamas / "b"), "layer_range": [1, 4]}]},
        ],
        "dtype": "float32",
    }
    ours = assert_same_as_mergekit(config, tmp_path, exact=True, layers=6)
    a, b = weights(llamas / "a"), weights(llamas / "b")
    assert torch.equal(ours["model.layers.3.mlp.up_proj.weight"], b["model.layers.1.mlp.up_proj.weight"])
    assert torch.equal(ours["model.embed_tokens.weight"], a["model.embed_tokens.weight"])
    assert torch.equal(ours["lm_head.weight"], b["lm_head.weight"])


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_passthrough_scale_filters(tmp_path, llamas, dtype):
    """passthrough's scale from every scope: a source's own, a slice's filters (the duplicated
    layers' o_proj and down_proj zeroed), a top-level gradient; in bf16 the inputs are converted
    first, as mergekit does."""
    a = str(llamas / "a")
    config = {
        "merge_method": "passthrough",
        "slices": [
            {"sources": [{"model": a, "layer_range": [0, 3], "parameters": {"scale": [{"filter": "embed", "value": 0.5}]}}]},
            {
                "sources": [{"model": a, "layer_range": [1, 4]}],
                "parameters": {"scale": [{"filter": "o_proj", "value": 0.0}, {"filter": "down_proj", "value": 0.0}]},
            },
        ],
        "parameters": {"scale": [{"filter": "q_proj", "value": [0.3, 1.7]}, {"filter": "lm_head", "value": 0.25}]},
        "dtype": dtype,
    }
    ours = assert_same_as_mergekit(config, tmp_path, exact=True, layers=6)
    source = weights(llamas / "a")
    q = "model.layers.{}.self_attn.q_proj.weight"
    assert torch.equal(ours["model.layers.4.self_attn.o_proj.weight"], torch.zeros_like(ours["model.layers.4.self_attn.o_proj.weight"]))
    if dtype == "float32":  # t = 1/2 in the first slice: 0.3 + (1.7 - 0.3) / 2 = 1.0, a plain copy
        assert torch.equal(ours[q.format(1)], source[q.format(1)]) and torch.equal(ours[q.format(0)], source[q.format(0)] * 0.3)
        assert torch.equal(ours["lm_head.weight"], source["lm_head.weight"] * 0.25)  # the last slice's: the top-level filter
        assert torch.equal(ours["model.embed_tokens.weight"], source["model.embed_tokens.weight"] * 0.5)  # the first slice's source


def test_per_slice_slerp_across_two_models(tmp_path, llamas):
    """Each slice merges same-size ranges of a and b with slerp, at different layers of each model,
    with its own t (a gradient over the second slice's layers)."""
    a, b = str(llamas / "a"), str(llamas / "b")
    config = {
        "merge_method": "slerp",
        "base_model": a,
        "slices": [
            {"sources": [{"model": a, "layer_range": [0, 2]}, {"model": b, "layer_range": [0, 2]}], "parameters": {"t": 0.3}},
            {
                "sources": [{"model": a, "layer_range": [2, 4]}, {"model": b, "layer_range": [1, 3]}],
                "parameters": {"t": [{"filter": "mlp", "value": [0.0, 1.0]}, {"value": 0.6}]},
            },
            {"sources": [{"model": a, "layer_range": [3, 4]}, {"model": b, "layer_range": [3, 4]}], "parameters": {"t": 0.8}},
        ],
    }
    assert_same_as_mergekit(config, tmp_path, exact=False, layers=5)


def test_per_slice_linear_without_a_base(tmp_path, llamas):
    """linear (no base_model: the first source is weighted as the base) over swapped ranges."""
    a, b = str(llamas / "a"), str(llamas / "b")
    config = {
        "merge_method": "linear",
        "slices": [
            {"sources": [{"model": a, "layer_range": [0, 2], "parameters": {"weight": 0.3}}, {"model": b, "layer_range": [2, 4]}]},
            {"sources": [{"model": a, "layer_range": [2, 4]}, {"model": b, "layer_range": [0, 2], "parameters": {"weight": 2.0}}]},
        ],
        "parameters": {"weight": 1.0},
    }
    assert_same_as_mergekit(config, tmp_path, exact=False, layers=4)


def test_single_model_layer_duplication(tmp_path, llamas):
    """Depth up-scaling of one model (SOLAR's stacking): overlapping ranges, written in bf16."""
    a = str(llamas / "a")
    config = {
        "merge_method": "passthrough",
        "base_model": a,
        "slices": [{"sources": [{"model": a, "layer_range": r}]} for r in ([0, 2], [1, 3], [2, 4])],
        "out_dtype": "bfloat16",
    }
    ours = assert_same_as_mergekit(config, tmp_path, exact=True, layers=6)
    assert torch.equal(ours["model.layers.1.self_attn.k_proj.weight"], ours["model.layers.2.self_attn.k_proj.weight"])


def test_passthrough_of_one_model_copies_it(tmp_path, llamas):
    config = {"merge_method": "passthrough", "models": [{"model": str(llamas / "b"), "parameters": {"scale": 2.0}}]}
    ours = assert_same_as_mergekit(config, tmp_path, exact=True, layers=4)
    assert torch.equal(ours["model.norm.weight"], 2 * weights(llamas / "b")["model.norm.weight"])


def test_a_killed_sliced_merge_resumes_to_the_same_shards(tmp_path, llamas):
    config = {
        "merge_method": "passthrough",
        "slices": [{"sources": [{"model": str(llamas / m), "layer_range": r}]} for m, r in (("a", [0, 3]), ("b", [2, 4]))],
        "parameters": {"scale": [{"filter": "up_proj", "value": 0.5}]},
    }
    path = tmp_path / "c.yml"
    path.write_text(yaml.safe_dump(config))
    run_mergekit(path, tmp_path / "whole", progress="never", shard_size="30KB")

    seen = []

    def kill_after_two(record):
        seen.append(record)
        if len(seen) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_mergekit(path, tmp_path / "resumed", progress="never", shard_size="30KB", on_shard=kill_after_two)
    written = []
    run_mergekit(path, tmp_path / "resumed", progress="never", shard_size="30KB", resume=True, on_shard=written.append)
    report = json.loads((tmp_path / "resumed" / "clpeft_merge_report.json").read_text())
    assert report["resumed_shards"] == 2 and len(written) == len(list((tmp_path / "whole").glob("model-*"))) - 2
    for shard in (tmp_path / "whole").glob("model-*.safetensors"):
        assert shard.read_bytes() == (tmp_path / "resumed" / shard.name).read_bytes(), shard.name


def run_cli(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    cli.configure_parser(parser)
    return cli.run(parser.parse_args(list(argv)))


def _bad(llamas: Path, change: str) -> dict:
    a, b = str(llamas / "a"), str(llamas / "b")
    two = [{"model": a, "layer_range": [0, 2]}, {"model": b, "layer_range": [0, 2]}]
    configs = {
        "lengths": {
            "merge_method": "slerp",
            "base_model": a,
            "parameters": {"t": 0.5},
            "slices": [{"sources": [two[0], {"model": b, "layer_range": [0, 3]}]}],
        },
        "bounds": {"merge_method": "passthrough", "slices": [{"sources": [{"model": a, "layer_range": [2, 6]}]}]},
        "empty": {"merge_method": "passthrough", "slices": [{"sources": [{"model": a, "layer_range": [2, 2]}]}]},
        "residual": {"merge_method": "passthrough", "slices": [{"sources": [two[0]], "residual_weight": 0.5}]},
        "source key": {"merge_method": "passthrough", "slices": [{"sources": [two[0] | {"revision": "main"}]}]},
        "range type": {"merge_method": "passthrough", "slices": [{"sources": [{"model": a, "layer_range": [0, 1.5]}]}]},
        "two sources": {"merge_method": "passthrough", "slices": [{"sources": two}]},
        "two models": {"merge_method": "passthrough", "base_model": a, "models": [{"model": a}, {"model": b}]},
        "passthrough parameter": {"merge_method": "passthrough", "slices": [{"sources": [two[0]], "parameters": {"weight": 1.0}}]},
        "base missing": {"merge_method": "slerp", "base_model": a, "parameters": {"t": 0.5}, "slices": [{"sources": [two[1]]}]},
        "widths": {
            "merge_method": "linear",
            "slices": [{"sources": two}, {"sources": [*two, {"model": str(llamas / "c"), "layer_range": [0, 2]}]}],
        },
    }
    return configs[change]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("lengths", r"slices\[0\]: the sources' layer_ranges hold 2 and 3 layers; every source of a slice needs the same number"),
        ("bounds", r"slices\[0\].sources\[0\].layer_range: layer_range \[2, 6\] is out of bounds: .* has 4 layers"),
        ("empty", r"layer_range \[2, 2\] is out of bounds"),
        ("residual", r"mergekit key 'residual_weight' is not supported by clpeft"),
        ("source key", r"slices\[0\].sources\[0\].revision: mergekit key 'revision' is not supported"),
        ("range type", r"layer_range is \[first, end\) as two integers"),
        ("two sources", r"passthrough copies one source per slice, slice 0 lists 2"),
        ("two models", r"merge_method 'passthrough' is not supported with 2 models"),
        ("passthrough parameter", r"mergekit parameter 'weight' is not supported for merge_method passthrough \(supported: scale\)"),
        ("base missing", r"slice 0 does not list the base_model"),
        ("widths", r"the slices merge different numbers of models \(\[1, 2\]\)"),
    ],
)
def test_bad_slices_are_one_line_errors_with_exit_2(tmp_path, llamas, capsys, change, message):
    from clpeft.cli import main

    path = tmp_path / "bad.yml"
    path.write_text(yaml.safe_dump(_bad(llamas, change)))
    with pytest.raises(UserError, match=message) as error:
        run_cli(str(path), "--out", str(tmp_path / "out"))
    assert "\n" not in str(error.value)
    capsys.readouterr()
    assert main(["merge", str(path), "--out", str(tmp_path / "out")]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_layout_renumbers_and_places_tensors(llamas):
    """The plan itself: output layer j of the second slice reads its source's layer a + i, with
    mergekit's t = i / (n - 1); the final norm belongs to the last slice."""
    a, b = llamas / "a", llamas / "b"
    layout = plan_slices([OutputSlice((SliceSource(a, 0, 1),)), OutputSlice((SliceSource(b, 1, 4),))], "single")
    assert layout.layers == 4 and layout.models == [a, b]
    slice_index, t, inputs = layout.tensors["model.layers.2.mlp.up_proj.weight"]
    assert (slice_index, t, inputs) == (1, 0.5, [(b, "model.layers.2.mlp.up_proj.weight")])
    assert layout.tensors["model.layers.1.mlp.up_proj.weight"][2] == [(b, "model.layers.1.mlp.up_proj.weight")]
    assert layout.tensors["model.layers.0.mlp.up_proj.weight"][:2] == (0, 1.0)  # a one-layer slice: t = 1
    assert layout.place("model.norm.weight") == (1, 0.0) and layout.place("model.embed_tokens.weight") == (0, 0.0)
    assert layout.origins == [(a, 0), (b, 1), (b, 2), (b, 3)]


def test_per_layer_layer_types_follow_the_stacked_layers(tmp_path):
    """Qwen 3 (as Gemma 3) lists each layer's attention in ``layer_types``; the output's list takes
    each layer's type from its origin, so transformers loads it. (mergekit 0.1.5 keeps the old list,
    and transformers refuses its config: num_hidden_layers must equal the number of layer_types.)"""
    from transformers import AutoModelForCausalLM, Qwen3Config, Qwen3ForCausalLM

    for seed, (name, full_layers) in enumerate((("a", 1), ("b", 3))):
        config = Qwen3Config(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=4,
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=8,
            vocab_size=99,
            use_sliding_window=True,
            sliding_window=4,
            max_window_layers=full_layers,
            tie_word_embeddings=False,
        )
        torch.manual_seed(seed)
        Qwen3ForCausalLM(config).save_pretrained(tmp_path / name)
    config = {
        "merge_method": "passthrough",
        "slices": [{"sources": [{"model": str(tmp_path / m), "layer_range": r}]} for m, r in (("a", [0, 3]), ("b", [1, 4]))],
    }
    (tmp_path / "q.yml").write_text(yaml.safe_dump(config))
    run_mergekit(tmp_path / "q.yml", tmp_path / "out", progress="never")
    types = json.loads((tmp_path / "out" / "config.json").read_text())["layer_types"]
    full, sliding = "full_attention", "sliding_attention"
    assert types == [full, sliding, sliding, full, full, sliding]
    ours, b = weights(tmp_path / "out"), weights(tmp_path / "b")
    assert torch.equal(ours["model.layers.3.self_attn.q_proj.weight"], b["model.layers.1.self_attn.q_proj.weight"])
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    assert model.config.layer_types == types and torch.isfinite(model(TOKENS).logits).all()


# ------------------------------------------------------------------ the shipped examples

EXAMPLES = sorted((Path(__file__).resolve().parents[2] / "configs" / "merge").glob("frankenmerge_*.yml"))


@pytest.fixture(scope="module")
def deep_llamas(tmp_path_factory) -> Path:
    """models/base, models/finetune_a, models/finetune_b as the examples name them: 32 layers, as a
    7B Llama or Mistral has (hidden 16), in bf16 as LLMs ship (the examples merge in bf16; mergekit
    would round float32 inputs to bf16 before SLERP, clpeft only its result)."""
    root = tmp_path_factory.mktemp("deep_llamas")
    for seed, name in enumerate(("base", "finetune_a", "finetune_b")):
        save_llama(root / "models" / name, seed, layers=32, hidden=16, dtype=torch.bfloat16)
    return root


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_example_configs_equal_mergekit(tmp_path, deep_llamas, monkeypatch, path):
    """clpeft reads the example's relative model paths from the working directory; mergekit, which
    would take them for hub names, gets them absolute."""
    config = yaml.safe_load(path.read_text())
    monkeypatch.chdir(deep_llamas)
    absolute = yaml.safe_load(path.read_text().replace("models/", f"{deep_llamas}/models/"))
    layers = sum(s["sources"][0]["layer_range"][1] - s["sources"][0]["layer_range"][0] for s in config["slices"])
    assert_same_as_mergekit(config, tmp_path, exact=config["merge_method"] == "passthrough", layers=layers, theirs=absolute)


@pytest.mark.parametrize(
    ("method", "parameters", "with_base"),
    [
        ("ties", {"density": 0.5, "weight": 1.0}, True),
        ("task_arithmetic", {"weight": 0.7}, True),
        ("multislerp", {"weight": 1.0}, False),
        ("karcher", {}, True),
    ],
)
def test_per_slice_merges_of_three_models(tmp_path, llamas, method, parameters, with_base):
    """Slices with three sources (a base and two others, or three base-free) at shifted ranges."""
    a, b, c = (str(llamas / m) for m in "abc")
    ranges = [([0, 2], [1, 3], [2, 4]), ([3, 4], [0, 1], [3, 4])]
    config = {
        "merge_method": method,
        "slices": [{"sources": [{"model": m, "layer_range": r} for m, r in zip((a, b, c), rs)]} for rs in ranges],
        "parameters": parameters,
    }
    if with_base:
        config["base_model"] = a
    assert_same_as_mergekit(config, tmp_path, exact=False, layers=3)
