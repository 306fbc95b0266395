"""mergekit's nearswap, ram, ramplus_tl and arcee_fusion against their formulas, worked by hand.

Their equality with mergekit's own functions is in tests/reference/test_mergekit_more.py; these
tests need no mergekit: float64 examples small enough to follow on paper, the methods' defining
properties on random tensors, their edge cases and one-line errors, and the two ways in (a clpeft
merge YAML and a mergekit YAML).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from clpeft.errors import UserError
from clpeft.merging import merge
from clpeft.merging.mergekit_yaml import plan_mergekit, run_mergekit
from clpeft.merging.methods import arcee_fusion as arcee_fusion_module
from clpeft.tools import merge_cli

F64 = torch.float64
EXACT = {"rtol": 0, "atol": 1e-15}


def one(values) -> dict[str, torch.Tensor]:
    return {"w": torch.tensor(values, dtype=F64)}


def random_models(tasks: int, shapes=((6, 5), (7,), (2, 3, 4)), seed: int = 0, density: float = 1.0):
    """A float64 base and ``tasks`` fine-tunes changing each entry with probability ``density``."""
    generator = torch.Generator().manual_seed(seed)
    base = {f"t{i}": torch.randn(s, generator=generator, dtype=F64) for i, s in enumerate(shapes)}
    tuned = []
    for _ in range(tasks):
        tuned.append(
            {
                k: v + 0.1 * torch.randn(v.shape, generator=generator, dtype=F64) * (torch.rand(v.shape, generator=generator) < density)
                for k, v in base.items()
            }
        )
    return base, tuned


# ------------------------------------------------------------------ nearswap


def test_nearswap_swaps_the_near_entries_and_moves_the_far_ones_by_t():
    """t = 0.1; |a - b| = 0.05, 0.2, 0.5, 0, 5e-7: w = 1 (0.1/0.05 clamped), 0.5, 0.2, 1, 1 (0.1/1e-6 clamped)."""
    base = one([0.0, 0.0, 0.0, 1.0, 2.0])
    tuned = [one([0.05, 0.2, -0.5, 1.0, 2.0 + 5e-7])]
    merged = merge(base, tuned, "nearswap", t=0.1)["w"]
    torch.testing.assert_close(merged, torch.tensor([0.05, 0.1, -0.1, 1.0, 2.0 + 5e-7], dtype=F64), **EXACT)


def test_nearswap_floors_the_distance_at_1e_6():
    """|a - b| = 5e-7, t = 2e-7: w = 2e-7 / 1e-6 = 0.2 (not 2e-7 / 5e-7 = 0.4), so theta = 1e-7."""
    merged = merge(one([0.0]), [one([5e-7])], "nearswap", t=2e-7)["w"]
    torch.testing.assert_close(merged, torch.tensor([1e-7], dtype=F64), rtol=1e-12, atol=0)


def test_nearswap_is_the_base_at_t_0_and_the_model_for_t_above_every_distance():
    base, tuned = random_models(1)
    for k, v in merge(base, tuned, "nearswap", t=0.0).items():
        assert torch.equal(v, base[k]), k
    largest = max(float((tuned[0][k] - base[k]).abs().max()) for k in base)
    for k, v in merge(base, tuned, "nearswap", t=largest).items():
        torch.testing.assert_close(v, tuned[0][k], rtol=0, atol=1e-15, msg=k)


def test_nearswap_errors_are_one_line():
    base, tuned = random_models(2)
    with pytest.raises(UserError, match="nearswap moves the base towards exactly one fine-tuned model, got 2") as error:
        merge(base, tuned, "nearswap")
    assert "\n" not in str(error.value)
    with pytest.raises(UserError, match="parameters.t: input should be greater than or equal to 0"):
        merge(base, tuned[:1], "nearswap", t=-0.1)


# ------------------------------------------------------------------ ram and ramplus_tl

# Three task vectors (base 0): entry 0 is changed by model 1 only, 1 by model 2 only, 2 by 1 and 2, 3 by
# model 3 only, 4 by all three, 5 by model 1 only; 6 by none above epsilon = 1e-5 (model 1's 1e-5 is not
# above it). Per model, unique / shared entries: model 1 {0, 5} / {2, 4}, model 2 {1} / {2, 4}, model 3 {3} / {4}.
RAM_TASKS = [
    [0.3, 0.0, 0.2, 0.0, -0.4, 0.1, 1e-5],
    [0.0, 0.6, 0.4, 0.0, 0.2, 0.0, 0.0],
    [0.0, 0.0, 0.0, 0.8, 0.5, 0.0, 0.0],
]


def test_ram_keeps_unique_entries_and_averages_shared_ones():
    merged = merge(one([0.0] * 7), [one(t) for t in RAM_TASKS], "ram")["w"]
    expected = [0.3, 0.6, (0.2 + 0.4) / 2, 0.8, (-0.4 + 0.2 + 0.5) / 3, 0.1, 0.0]
    torch.testing.assert_close(merged, torch.tensor(expected, dtype=F64), **EXACT)
    with_every_change = merge(one([0.0] * 7), [one(t) for t in RAM_TASKS], "ram", epsilon=0.0)["w"]
    assert with_every_change[6] == 1e-5  # epsilon 0: every non-zero entry contributes


def test_ram_is_the_sum_of_disjoint_task_vectors_and_the_mean_of_dense_ones():
    base, dense = random_models(3)
    for k, v in merge(base, dense, "ram").items():
        torch.testing.assert_close(v, sum(m[k] for m in dense) / 3, rtol=0, atol=1e-14, msg=k)
    slots = {k: torch.randint(0, 3, v.shape, generator=torch.Generator().manual_seed(1)) for k, v in base.items()}
    disjoint = [{k: torch.where(slots[k] == i, m[k], base[k]) for k in base} for i, m in enumerate(dense)]
    for k, v in merge(base, disjoint, "ram").items():
        torch.testing.assert_close(v, base[k] + sum(m[k] - base[k] for m in disjoint), rtol=0, atol=1e-14, msg=k)


def test_ramplus_tl_scales_each_models_unique_entries_by_its_overlap():
    """r = 0.5, alpha = 1.5: rho = 2/2, 2/1 (clamped to 1.5), 1/1, so lambda = 1.5, 1.75, 1.5."""
    merged = merge(one([0.0] * 7), [one(t) for t in RAM_TASKS], "ramplus_tl", r=0.5, alpha=1.5)["w"]
    expected = [0.3 * 1.5, 0.6 * 1.75, 0.3, 0.8 * 1.5, 0.1, 0.1 * 1.5, 0.0]
    torch.testing.assert_close(merged, torch.tensor(expected, dtype=F64), **EXACT)


def test_ramplus_tl_with_r_0_is_ram_and_ignores_a_model_that_changes_nothing():
    base, tuned = random_models(3, density=0.4)
    ram = merge(base, tuned, "ram")
    assert all(torch.equal(v, ram[k]) for k, v in merge(base, tuned, "ramplus_tl", r=0.0).items())
    # epsilon 0 and an unchanged model: u_k = s_k = 0 (mergekit's lambda_k would be 0/0)
    merged = merge(base, [*tuned, base], "ramplus_tl", epsilon=0.0)
    without = merge(base, tuned, "ramplus_tl", epsilon=0.0)
    assert all(torch.equal(v, without[k]) for k, v in merged.items())


def test_ramplus_tl_errors_are_one_line():
    base, tuned = random_models(2)
    with pytest.raises(UserError, match="parameters.alpha: input should be greater than or equal to 0"):
        merge(base, tuned, "ramplus_tl", alpha=-0.1)
    with pytest.raises(UserError, match="parameters.epsilon: input should be greater than or equal to 0"):
        merge(base, tuned, "ram", epsilon=-1.0)


# ------------------------------------------------------------------ arcee_fusion


def _fusion_by_hand(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The formula in plain Python floats: per-row KL of softmax(b) + 1e-8 to softmax(a) + 1e-8, importance
    |b - a| KL, fence Q2 + 1.5 (Q3 - Q1) with Q_q the floor(q (n - 1))-th smallest importance."""
    columns = a.shape[-1] if a.dim() else 1
    rows_a, rows_b = a.reshape(-1, columns).tolist(), b.reshape(-1, columns).tolist()
    importance = []
    for row_a, row_b in zip(rows_a, rows_b):
        za, zb = sum(math.exp(x) for x in row_a), sum(math.exp(x) for x in row_b)
        p = [math.exp(x) / zb + 1e-8 for x in row_b]
        q = [math.exp(x) / za + 1e-8 for x in row_a]
        kl = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q))
        importance += [abs(y - x) * kl for x, y in zip(row_a, row_b)]
    ordered, last = sorted(importance), len(importance) - 1
    fence = ordered[last // 2] + 1.5 * (ordered[3 * last // 4] - ordered[last // 4])
    keep = torch.tensor([i >= fence for i in importance]).view(a.shape)
    return torch.where(keep, b, a)


@pytest.mark.parametrize(
    ("seventh", "kept"),
    [
        (0.11, [0.11, 0.5]),  # torch.quantile's interpolated quartiles (2.75, 4.5, 6 + 0.25 * 5) would fence at 11.25
        (0.098, [0.5]),  # a fence of Q2 + 1.4 IQR (9.6) would keep 9.8 too
    ],
)
def test_arcee_fusion_keeps_the_changes_above_the_upper_fence_with_lower_order_statistics(seventh, kept):
    """One row, so the KL is one positive number c and the importance is c |tau|. Sorted |tau| (x100):
    1 2 3 4 5 6 x 50; n = 8: Q1, Q2, Q3 are the 1st, 3rd and 5th smallest (from 0), 2, 4 and 6, and the
    fence is 4 + 1.5 (6 - 2) = 10: x = 11 is kept, x = 9.8 is not."""
    tau = torch.tensor([-0.03, 0.5, 0.01, -seventh, -0.06, 0.02, 0.05, -0.04], dtype=F64)
    base = torch.linspace(-1.0, 1.0, 8, dtype=F64)
    merged = merge({"w": base}, [{"w": base + tau}], "arcee_fusion")["w"]
    expected = base + torch.where(torch.isin(tau.abs(), torch.tensor(kept, dtype=F64)), tau, 0.0)
    torch.testing.assert_close(merged, expected, **EXACT)
    if seventh == 0.11:
        interpolated = torch.quantile(100 * tau.abs(), torch.tensor([0.25, 0.5, 0.75], dtype=F64))
        assert float(interpolated[1] + 1.5 * (interpolated[2] - interpolated[0])) == pytest.approx(11.25)


@pytest.mark.parametrize("scale", [1.0, 40.0])  # 40: most softmax probabilities are below the 1e-8 added to them
def test_arcee_fusion_equals_the_formula_per_row_of_the_last_dimension(scale):
    base, tuned = random_models(1, shapes=((6, 5), (7,), (2, 3, 4), (40, 3)), seed=4)
    base, tuned = {k: scale * v for k, v in base.items()}, [{k: scale * v for k, v in tuned[0].items()}]
    tuned[0]["t3"][5] += scale * torch.tensor([0.8, -0.8, 0.4], dtype=F64)  # one row changes its softmax much more than the others
    merged = merge(base, tuned, "arcee_fusion")
    for k in base:
        torch.testing.assert_close(merged[k], _fusion_by_hand(base[k], tuned[0][k]), rtol=1e-15, atol=1e-15, msg=k)
    if scale == 1.0:  # row 5 kept whole, with few entries of the other rows (at 40 every row's softmax moves much)
        torch.testing.assert_close(merged["t3"][5], tuned[0]["t3"][5], rtol=1e-15, atol=1e-15)
        assert int((merged["t3"] != base["t3"]).sum()) < 120 / 4


def test_arcee_fusion_forms_the_divergence_in_blocks_of_rows(monkeypatch):
    base, tuned = random_models(1, shapes=((9, 5), (2, 3, 4)), seed=5)
    whole = merge(base, tuned, "arcee_fusion")
    monkeypatch.setattr(arcee_fusion_module, "_ROW_BLOCK_ENTRIES", 8)  # one row per block here
    assert all(torch.equal(v, whole[k]) for k, v in merge(base, tuned, "arcee_fusion").items())


def test_arcee_fusion_of_an_unchanged_model_or_a_scalar():
    base, _ = random_models(1)
    assert all(torch.equal(v, base[k]) for k, v in merge(base, [base], "arcee_fusion").items())
    scalar = {"s": torch.tensor(1.0, dtype=F64)}  # one entry: importance 0 >= fence 0, the model's value
    assert merge(scalar, [{"s": torch.tensor(3.0, dtype=F64)}], "arcee_fusion")["s"] == 3.0


def test_arcee_fusion_errors_are_one_line():
    base, tuned = random_models(2)
    with pytest.raises(UserError, match="arcee_fusion fuses exactly one fine-tuned model into the base, got 2") as error:
        merge(base, tuned, "arcee_fusion")
    assert "\n" not in str(error.value)
    with pytest.raises(UserError, match="unknown parameter of merge method 'arcee_fusion'"):
        merge(base, tuned[:1], "arcee_fusion", t=0.5)


# ------------------------------------------------------------------ bf16, clpeft YAML, mergekit YAML

CASES = [("nearswap", {"t": 0.05}, 1), ("ram", {}, 3), ("ramplus_tl", {"r": 0.5, "alpha": 1.0}, 3), ("arcee_fusion", {}, 1)]


@pytest.mark.parametrize(("name", "parameters", "tasks"), CASES, ids=[c[0] for c in CASES])
def test_bf16_merges_are_the_float64_merge_rounded_once(name, parameters, tasks):
    base, tuned = random_models(tasks, density=0.5, seed=6)
    base16, tuned16 = {k: v.bfloat16() for k, v in base.items()}, [{k: v.bfloat16() for k, v in m.items()} for m in tuned]
    merged = merge(base16, tuned16, name, **parameters)
    truth = merge({k: v.double() for k, v in base16.items()}, [{k: v.double() for k, v in m.items()} for m in tuned16], name, **parameters)
    assert all(v.dtype == torch.bfloat16 for v in merged.values())
    assert sum(int((merged[k] != truth[k].bfloat16()).sum()) for k in base) <= 1


@pytest.mark.parametrize(("name", "parameters", "tasks"), CASES, ids=[c[0] for c in CASES])
def test_clpeft_merge_yaml_runs_each_method(tmp_path, models, model_files, name, parameters, tasks):
    base, finetuned = models
    base_path, paths = model_files
    config = {"base": str(base_path), "models": [str(p) for p in paths[:tasks]], "method": name, "out": str(tmp_path / "out.safetensors")}
    if parameters:
        config["parameters"] = parameters
    (tmp_path / "merge.yml").write_text(yaml.safe_dump(config))
    parser = argparse.ArgumentParser()
    merge_cli.configure_parser(parser)
    assert merge_cli.run(parser.parse_args([str(tmp_path / "merge.yml")])) == 0
    expected = merge(base, finetuned[:tasks], name, **parameters)
    merged = load_file(tmp_path / "out.safetensors")
    assert merged.keys() == expected.keys() and all(torch.equal(merged[k], expected[k]) for k in expected)


def _save_tiny_llama(directory: Path) -> None:
    spec = importlib.util.spec_from_file_location("tiny_llama", Path(__file__).parents[1] / "llm" / "tiny_llama.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.save_tiny_llama(directory)


@pytest.fixture(scope="module")
def sparse_llamas(tmp_path_factory):
    """The tiny Llama and three fine-tunes that each change 30% of its entries (RL-like sparse updates)."""
    root = tmp_path_factory.mktemp("sparse_llamas")
    _save_tiny_llama(root / "base")
    base = load_file(root / "base" / "model.safetensors")
    for k in range(3):
        generator = torch.Generator().manual_seed(k + 1)
        changed = {
            n: t + 0.01 * torch.randn(t.shape, generator=generator) * (torch.rand(t.shape, generator=generator) < 0.3)
            for n, t in base.items()
        }
        (root / f"ft{k}").mkdir()
        save_file(changed, root / f"ft{k}" / "model.safetensors", metadata={"format": "pt"})
        shutil.copy(root / "base" / "config.json", root / f"ft{k}" / "config.json")
    return root


def _read_directory(directory: Path) -> dict[str, torch.Tensor]:
    index = directory / "model.safetensors.index.json"
    files = set(json.loads(index.read_text())["weight_map"].values()) if index.exists() else {"model.safetensors"}
    merged = {}
    for file in files:
        merged |= load_file(directory / file)
    return merged


def mergekit_yaml(root: Path, name: str, parameters: dict, tasks: int) -> dict:
    """mergekit's form: the base listed among the models, shared parameters at the top."""
    models = [{"model": str(root / "base")}, *({"model": str(root / f"ft{k}")} for k in range(tasks))]
    config = {"merge_method": name, "base_model": str(root / "base"), "models": models, "dtype": "float32"}
    return config | ({"parameters": parameters} if parameters else {})


@pytest.mark.parametrize(("name", "parameters", "tasks"), CASES, ids=[c[0] for c in CASES])
def test_mergekit_yaml_runs_each_method(tmp_path, sparse_llamas, name, parameters, tasks):
    path = tmp_path / "mergekit.yml"
    path.write_text(yaml.safe_dump(mergekit_yaml(sparse_llamas, name, parameters, tasks)))
    run_mergekit(path, tmp_path / "out", progress="never")
    base = load_file(sparse_llamas / "base" / "model.safetensors")
    tuned = [load_file(sparse_llamas / f"ft{k}" / "model.safetensors") for k in range(tasks)]
    expected = merge(base, tuned, name, **parameters)
    merged = _read_directory(tmp_path / "out")
    assert merged.keys() == expected.keys() and all(torch.equal(merged[k], expected[k]) for k in expected)
    assert any(not torch.equal(merged[k], base[k]) for k in base)


def test_mergekit_yaml_translates_the_parameters_and_needs_nearswaps_t(sparse_llamas):
    plan = plan_mergekit(mergekit_yaml(sparse_llamas, "ramplus_tl", {"r": 0.3, "epsilon": 1e-4}, 3))
    assert plan.method == "ramplus_tl" and len(plan.models) == 3
    assert plan.parameters_of("model.layers.0.mlp.up_proj.weight") == {"r": 0.3, "alpha": 0.2, "epsilon": 1e-4}
    assert plan_mergekit(mergekit_yaml(sparse_llamas, "arcee_fusion", {}, 1)).parameters_of("lm_head.weight") == {}
    with pytest.raises(UserError, match="mergekit's nearswap needs the parameter t"):
        plan_mergekit(mergekit_yaml(sparse_llamas, "nearswap", {}, 1))


@pytest.mark.parametrize(("name", "parameters", "tasks"), CASES, ids=[c[0] for c in CASES])
def test_mergekit_yaml_equals_mergekit_run_merge(tmp_path, sparse_llamas, name, parameters, tasks):
    """The same YAML through ``mergekit-yaml``'s run_merge and through clpeft: float32 rounding apart
    (rtol 1e-5, atol 1e-6), arcee_fusion keeping the same entries (its tensors are below 1M entries)."""
    pytest.importorskip("mergekit", reason="mergekit is not installed: pip install 'mergekit>=0.1.5'")
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    config = mergekit_yaml(sparse_llamas, name, parameters, tasks)
    options = MergeOptions(cuda=False, copy_tokenizer=False, lazy_unpickle=False, quiet=True, random_seed=0)
    run_merge(MergeConfiguration.model_validate(config), str(tmp_path / "mergekit"), options=options)
    (tmp_path / "config.yml").write_text(yaml.safe_dump(config))
    run_mergekit(tmp_path / "config.yml", tmp_path / "clpeft", progress="never")
    ours, theirs = _read_directory(tmp_path / "clpeft"), _read_directory(tmp_path / "mergekit")
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert ours[key].dtype == theirs[key].dtype, key
        torch.testing.assert_close(ours[key], theirs[key], rtol=1e-5, atol=1e-6, msg=f"{name} {key}")
