"""Registry-driven smoke tests: every registered strategy, scenario and merge method runs.

As timm's ``tests/test_models.py`` runs over ``list_models()``, the cases here are the
registries' names, read when the tests are collected: a newly registered method is tested
with no new test code, and a name without an entry in the tables below fails ("add a smoke
config"). Each strategy trains a two-experience stream through the real engine on a tiny
model on the CPU (sklearn digits, a few samples per class), each scenario yields the stream it
was configured for, and each merge method merges two tiny state dicts.

What is asserted could fail: the accuracy matrix's shape and range, that the experience changed
the method's trainable parameters (or its state, for training-free methods), that the second
experience's classes are learnt, that a test-time method adapts (and ``source`` does not).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import textwrap
from pathlib import Path
from typing import Literal

import numpy as np
import pytest
import torch

import clpeft.config
import clpeft.engine
from clpeft.merging import get_method, list_methods, merge
from clpeft.registry import scenarios, strategies

MLP = {"name": "mlp", "hidden": [32]}
FROZEN_MLP = {"name": "mlp", "hidden": [32], "freeze": True}
VIT = {"name": "timm", "model": "test_vit", "img_size": 32, "freeze": True}
CNN = {"name": "cnn", "widths": [8, 16]}
LORA_TARGETS = ["net.0"]  # the MLP's first linear layer

TINY_LLAMA = {"name": "generative_lm", "weights": "tiny-llama"}  # _config writes the tiny Llama under the run's root
INSTRUCTIONS = {
    "name": "instruction_incremental",
    "tasks": [
        {"task": "reverse", "train": 16, "test": 8, "max_new_tokens": 4},
        {"task": "caesar", "train": 16, "test": 8, "max_new_tokens": 4},
    ],
}
CLASS_INCREMENTAL = {
    "name": "class_incremental",
    "dataset": "sklearn_digits",
    "n_experiences": 2,
    "train_per_class": 16,
    "test_per_class": 8,
}
FEW_SHOT = {
    "name": "few_shot_class_incremental",
    "dataset": "sklearn_digits",
    "n_base": 5,
    "n_way": 5,
    "k_shot": 5,
    "n_sessions": 1,
    "base_per_class": 16,
    "test_per_class": 8,
}
TEST_TIME = {
    "name": "test_time_adaptation",
    "dataset": "sklearn_digits",
    "corruptions": ["gaussian_noise", "brightness"],
    "severity": 3,
    "train_per_class": 24,
    "test_per_class": 8,
}

Change = Literal["trained", "state", "adapted", "outputs", "none"]


@dataclasses.dataclass(frozen=True)
class Smoke:
    """How one strategy runs in the smoke test.

    Attributes:
        strategy: the ``strategy`` section (small sizes; defaults elsewhere).
        backbone: the ``backbone`` section (a ViT for prompt methods, a CNN with BatchNorm for TTA).
        scenario: the ``scenario`` section: a two-experience stream.
        change: what the first experience must change: ``trained`` (a trainable parameter
            outside the head), ``state`` (anything in the state dict: training-free methods),
            ``adapted`` (TTA: parameters or buffers after the domains differ from the source
            model's), ``outputs`` (TTA without updates: the source model is left as trained and
            ``adapt`` differs from ``predict``), ``none`` (the source model, left as trained).
        epochs: training epochs per experience (the source phase, for TTA).
        learns: empty when the second experience's classes must be learnt (above twice
            chance); else why this tiny setup cannot show it (the other checks still run).
    """

    strategy: dict
    backbone: dict = dataclasses.field(default_factory=lambda: MLP)
    scenario: dict = dataclasses.field(default_factory=lambda: CLASS_INCREMENTAL)
    change: Change = "trained"
    epochs: int = 5
    learns: str = ""


def _tta(strategy: dict, change: Change = "adapted") -> Smoke:
    return Smoke(strategy, CNN, TEST_TIME, change)


# One entry per registered strategy; a registration without one fails test_every_strategy_has_a_smoke_config.
STRATEGIES: dict[str, Smoke] = {
    "finetune": Smoke({"name": "finetune"}),
    "joint": Smoke({"name": "joint"}),
    "replay": Smoke({"name": "replay", "mem_size": 20}),
    "lwf": Smoke({"name": "lwf"}),
    "ewc": Smoke({"name": "ewc", "ewc_lambda": 1.0}),
    "er_ace": Smoke({"name": "er_ace", "mem_size": 20}),
    "derpp": Smoke({"name": "derpp", "mem_size": 20}),
    "gdumb": Smoke({"name": "gdumb", "mem_size": 20}),
    "agem": Smoke({"name": "agem", "mem_size": 20}),
    "icarl": Smoke({"name": "icarl", "mem_size": 20}),
    "si": Smoke({"name": "si", "c": 0.1}),
    "mas": Smoke({"name": "mas", "lambda_reg": 0.1}),
    "wa": Smoke({"name": "wa", "mem_size": 20}),
    "bic": Smoke({"name": "bic", "mem_size": 20, "bias_epochs": 5}),
    "lucir": Smoke({"name": "lucir", "mem_size": 20, "finetune_epochs": 2}),
    "x_der": Smoke({"name": "x_der", "mem_size": 20}),
    "slca": Smoke({"name": "slca", "align_epochs": 1, "align_samples": 16}),
    "cofima": Smoke({"name": "cofima", "align_epochs": 1, "align_samples": 16}),
    "duct": Smoke({"name": "duct", "retrain_epochs": 2}),
    "simplecil": Smoke({"name": "simplecil"}, FROZEN_MLP, change="state"),
    "ranpac": Smoke({"name": "ranpac", "projection_dim": 64}, FROZEN_MLP, change="state"),
    "fecam": Smoke({"name": "fecam"}, FROZEN_MLP, change="state"),
    "fsa_lda": Smoke({"name": "fsa_lda"}),
    "aper": Smoke({"name": "aper", "adapter_bottleneck": 4}, VIT),
    "ease": Smoke({"name": "ease", "adapter_bottleneck": 4}, VIT, change="state"),
    "l2p": Smoke(
        {"name": "l2p", "pool_size": 4, "prompt_length": 2, "top_k": 2},
        VIT,
        learns="L2P's head reads the prompt tokens' mean, which a random-init test_vit leaves nearly "
        "constant across inputs (relative std ~0.05): chance accuracy at any lr/epochs tried",
    ),
    "dualprompt": Smoke({"name": "dualprompt", "pool_size": 4, "g_length": 2, "g_layers": [0], "e_length": 2, "e_layers": [1]}, VIT),
    "coda_prompt": Smoke({"name": "coda_prompt", "components_per_task": 2, "prompt_length": 2, "layers": [0, 1]}, VIT),
    "ovor": Smoke({"name": "ovor", "g_length": 2, "e_length": 2, "regular_epochs": 3, "offsets": 20, "boundary_points": 4}, VIT),
    "mos": Smoke({"name": "mos", "adapter_bottleneck": 4, "align_epochs": 1, "align_samples": 8}, VIT, change="state"),
    "hide_prompt": Smoke(
        {
            "name": "hide_prompt",
            "pool_size": 4,
            "prompt_length": 2,
            "prompt_layers": [0, 1],
            "n_centroids": 2,
            "tap_epochs": 2,
            "tap_samples": 8,
            "tii_epochs": 5,
            "tii_lr": 0.01,
        },
        VIT,
    ),
    "hide_lora": Smoke(
        {
            "name": "hide_lora",
            "pool_size": 4,
            "rank": 2,
            "lora_layers": [0, 1],
            "n_centroids": 2,
            "tap_epochs": 2,
            "tap_samples": 8,
            "tii_epochs": 5,
            "tii_lr": 0.01,
        },
        VIT,
    ),
    "lora_cl": Smoke({"name": "lora_cl", "targets": LORA_TARGETS, "rank": 2}),
    "lae": Smoke({"name": "lae", "targets": LORA_TARGETS, "rank": 2, "freeze_epochs": 0}),
    "merge_cl": Smoke({"name": "merge_cl", "targets": LORA_TARGETS, "rank": 2}),
    "fscil_proto": Smoke({"name": "fscil_proto"}, CNN, FEW_SHOT),
    "source": _tta({"name": "source"}, change="none"),
    "bn_adapt": _tta({"name": "bn_adapt"}),
    "tent": _tta({"name": "tent"}),
    "eata": _tta({"name": "eata", "fisher_size": 64}),
    "cotta": _tta({"name": "cotta", "n_augmentations": 2}),
    "dual_teacher": _tta({"name": "dual_teacher", "period": 2}),
    "rmt": _tta({"name": "rmt", "warmup_samples": 32, "projection_dim": 16}),
    "lame": _tta({"name": "lame", "knn": 3}, change="outputs"),
    "sar": _tta({"name": "sar"}),
    "rdumb": _tta({"name": "rdumb", "reset_every": 3}),
    "deyo": _tta({"name": "deyo", "patch_len": 2}),
    "memo": _tta({"name": "memo", "n_augmentations": 2}),
    "rotta": _tta({"name": "rotta", "memory_size": 8, "update_frequency": 8, "flip": 0.0}),
    "roid": _tta({"name": "roid", "flip": 0.0}),
    "rpl": _tta({"name": "rpl"}),
    "cmf": _tta({"name": "cmf", "flip": 0.0}),
    "santa": _tta({"name": "santa", "projection_dim": 16, "flip": 0.0}),
    "adacontrast": _tta({"name": "adacontrast", "queue_size": 64}),
    "adanpc": _tta({"name": "adanpc"}, change="outputs"),
    "seq_finetune": Smoke(
        {"name": "seq_finetune", "lora_rank": 2},
        TINY_LLAMA,
        INSTRUCTIONS,
        learns="answers are scored by exact match, where chance is not 1/classes; "
        "tests/llm/test_seq_finetune.py shows a task learnt and forgotten",
    ),
    "o_lora": Smoke(
        {"name": "o_lora", "lora_rank": 2},
        TINY_LLAMA,
        INSTRUCTIONS,
        learns="answers are scored by exact match, where chance is not 1/classes; tests/llm/test_o_lora.py shows both tasks learnt",
    ),
    "task_lora": Smoke(
        {"name": "task_lora", "lora_rank": 2}, TINY_LLAMA, INSTRUCTIONS, learns="exact match; tests/llm/test_task_adapters.py"
    ),
}


def _tiny_llama(root: Path) -> Path:
    """The tiny random Llama of tests/llm/tiny_llama.py, written once under ``root``."""
    directory = root / "tiny_llama"
    if not directory.is_dir():
        spec = importlib.util.spec_from_file_location("tiny_llama", Path(__file__).parent / "llm" / "tiny_llama.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        module.save_tiny_llama(directory)
    return directory


def _config(smoke: Smoke, root) -> dict:
    return {
        "seed": 0,
        "scenario": {**smoke.scenario, **({"root": str(root)} if "dataset" in smoke.scenario else {})},
        "backbone": {**TINY_LLAMA, "weights": str(_tiny_llama(root))} if smoke.backbone is TINY_LLAMA else smoke.backbone,
        "strategy": smoke.strategy,
        "train": {"epochs": smoke.epochs, "batch_size": 16, "lr": 0.01, "optimizer": "adam"},
        "eval": {"batch_size": 128, "baseline": False},
        "logging": {"tensorboard": False, "progress": "never"},
    }


def _snapshot(module: torch.nn.Module) -> dict:
    """A deep copy of the state dict (tensors cloned, extra state kept as it is)."""
    return {k: v.detach().clone() if torch.is_tensor(v) else repr(v) for k, v in module.state_dict().items()}


def _differs(a, b) -> bool:
    if torch.is_tensor(a) and torch.is_tensor(b):
        return a.shape != b.shape or not torch.equal(a, b)
    return a != b


def _changed(before: dict, after: dict, names=None) -> list[str]:
    names = set(before) | set(after) if names is None else names
    return sorted(n for n in names if n not in before or n not in after or _differs(before[n], after[n]))


def _built_in(registry, package: str) -> list[str]:
    """The names registered by clpeft's own modules (tests and the README register plug-ins too)."""
    return [n for n in registry.names() if registry.get(n).__module__.startswith(package + ".")]


def test_every_strategy_has_a_smoke_config():
    built_in = _built_in(strategies, "clpeft.strategies")
    missing = sorted(set(built_in) - set(STRATEGIES))
    stale = sorted(set(STRATEGIES) - set(built_in))
    assert not missing, f"registered strategies without a smoke config in STRATEGIES: {missing}"
    assert not stale, f"STRATEGIES lists names that are not registered: {stale}"


@pytest.mark.parametrize("name", _built_in(strategies, "clpeft.strategies"))
def test_strategy_runs_a_two_experience_stream(name, tmp_path):
    if name not in STRATEGIES:
        pytest.fail(f"strategy '{name}' is registered but has no smoke config: add it to STRATEGIES in {__file__}")
    smoke = STRATEGIES[name]
    engine = clpeft.engine.Engine(clpeft.config.resolve(_config(smoke, tmp_path / "data")), tmp_path / "run", device="cpu")
    built = engine.build()
    strategy = built.strategy
    snapshots: dict[str, dict] = {}
    hook = strategy.before_experience

    def spied(exp):
        if exp.index == 1:  # the first experience (or the source phase) is over
            snapshots["after_first"] = _snapshot(strategy)
        hook(exp)
        if exp.index == 0:
            snapshots["trainable"] = {n for n, p in strategy.named_parameters() if p.requires_grad}
            snapshots["first_start"] = _snapshot(strategy)

    strategy.before_experience = spied
    result = engine.run(built)
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["acc_matrix"] == result["acc_matrix"]
    R = np.asarray(result["acc_matrix"], dtype=float)
    assert np.all(np.isfinite(R)) and np.all((R >= 0) & (R <= 1)), R
    end = _snapshot(strategy)

    if smoke.scenario is TEST_TIME:
        n_domains = len(TEST_TIME["corruptions"])
        assert R.shape == (1, n_domains)
        errors = result["metrics"]["error_per_domain"]
        assert len(errors) == n_domains and np.allclose(errors, 1 - R[0]), result["metrics"]
        assert max(errors) < 0.7, f"{name}: online error {errors} on 10 classes (chance 0.9)"
        tensors = {n for n, _ in strategy.named_parameters()}
        if smoke.change != "outputs":  # LAME's bookkeeping buffers may change, its parameters not
            tensors |= {n for n, _ in strategy.named_buffers()}
        adapted = _changed(snapshots["after_first"], end, tensors)
        if smoke.change == "adapted":
            assert adapted, f"{name} left the source model's parameters and buffers unchanged on every domain"
            return
        assert not adapted, f"{name} changed {adapted} at test time"
        if smoke.change == "outputs":  # a parameter-free method: its outputs differ from the model's
            x = built.stream[0].test.load()[0][:32]
            with torch.no_grad():
                source = strategy.predict(x).softmax(1)
            assert not torch.allclose(strategy.adapt(x).softmax(1), source, atol=1e-3), f"{name}: adapt == predict"
        return

    assert R.shape == (2, 2)
    first, start = snapshots["after_first"], snapshots["first_start"]
    if smoke.change == "trained":
        beyond_head = {n for n in snapshots["trainable"] if not n.startswith("head.")}
        changed = _changed(start, first, beyond_head or snapshots["trainable"])
        assert changed, f"{name}: no trainable parameter of {sorted(beyond_head)} changed in the first experience"
    else:
        assert _changed(start, first), f"{name}: the first experience left its state unchanged"
    if smoke.learns:
        return
    n_seen = len(built.stream[1].classes_seen_so_far)
    assert R[1, 1] > 2.0 / n_seen, f"{name}: accuracy {R[1, 1]:.3f} on the second experience's classes (chance {1 / n_seen:.2f})"


# ------------------------------------------------------------------ scenarios

AVALANCHE_BENCH = textwrap.dedent("""
    import numpy as np, torch
    from sklearn.datasets import load_digits
    from torch.utils.data import TensorDataset
    from avalanche.benchmarks import nc_benchmark

    def make(n_experiences, seed=0):
        d = load_digits()
        x = torch.from_numpy(np.rint(d.images * 255 / 16).astype(np.uint8)).unsqueeze(1)
        y = torch.from_numpy(d.target)
        tr = TensorDataset(x[::4], y[::4]); tr.targets = y[::4].tolist()
        te = TensorDataset(x[1::8], y[1::8]); te.targets = y[1::8].tolist()
        return nc_benchmark(tr, te, n_experiences=n_experiences, task_labels=False, seed=seed)
""")

# scenario name -> (its section, the number of experiences it must yield)
SCENARIOS: dict[str, tuple[dict, int]] = {
    "class_incremental": (CLASS_INCREMENTAL, 2),
    "few_shot_class_incremental": (FEW_SHOT, 2),
    "domain_incremental": (
        {
            "name": "domain_incremental",
            "dataset": "sklearn_digits",
            "train_per_class": 16,
            "test_per_class": 8,
            "domains": [{}, {"rotation": 90}],
        },
        2,
    ),
    "test_time_adaptation": (TEST_TIME, 2),
    "avalanche": ({"name": "avalanche", "benchmark": "smoke_digits_bench:make", "kwargs": {"n_experiences": 2}}, 2),
    "instruction_incremental": (INSTRUCTIONS, 2),
}
# scenario -> the strategy and backbone its stream runs with (default: finetune on an MLP, a CNN for TTA)
SCENARIO_RUNS = {"instruction_incremental": STRATEGIES["seq_finetune"]}


def test_every_scenario_has_a_smoke_config():
    missing = sorted(set(_built_in(scenarios, "clpeft.scenarios")) - set(SCENARIOS))
    assert not missing, f"registered scenarios without a smoke config in SCENARIOS: {missing}"


@pytest.mark.parametrize("name", _built_in(scenarios, "clpeft.scenarios"))
def test_scenario_yields_its_stream_and_runs(name, tmp_path, monkeypatch):
    if name not in SCENARIOS:
        pytest.fail(f"scenario '{name}' is registered but has no smoke config: add it to SCENARIOS in {__file__}")
    (tmp_path / "smoke_digits_bench.py").write_text(AVALANCHE_BENCH)
    monkeypatch.syspath_prepend(str(tmp_path))
    section, n_experiences = SCENARIOS[name]
    run = SCENARIO_RUNS.get(name)
    smoke = Smoke(
        run.strategy if run else {"name": "finetune"}, run.backbone if run else CNN if section is TEST_TIME else MLP, section, epochs=1
    )
    engine = clpeft.engine.Engine(clpeft.config.resolve(_config(smoke, tmp_path / "data")), tmp_path / "run", device="cpu")
    built = engine.build()
    stream, kind = built.stream, built.scenario.kind
    assert len(stream) == n_experiences
    assert [e.index for e in stream] == list(range(1, n_experiences + 1) if kind == "test_time_adaptation" else range(n_experiences))
    n_classes = len(built.scenario.class_names)
    for exp in stream:
        if exp.train is None:  # a test-time domain: unlabeled to the strategy, every class in its test data
            assert set(exp.test.load()[1].tolist()) == set(range(n_classes)) == set(exp.classes_seen_so_far)
            continue
        labels = set(exp.train.load()[1].tolist())
        assert labels == set(exp.classes_in_this_experience) and labels <= set(range(n_classes))
    if kind in ("class_incremental", "few_shot_class_incremental"):
        seen: list[int] = []
        for exp in stream:
            assert not set(exp.classes_in_this_experience) & set(seen), "an experience repeats earlier classes"
            seen += exp.classes_in_this_experience
            assert sorted(exp.classes_seen_so_far) == sorted(seen)
    else:
        if kind == "domain_incremental":
            assert all(e.classes_in_this_experience == list(range(n_classes)) for e in stream)
        assert len({e.domain for e in stream}) == n_experiences, [e.domain for e in stream]
    R = np.asarray(engine.run(built)["acc_matrix"])
    assert R.shape == ((1, n_experiences) if kind == "test_time_adaptation" else (n_experiences, n_experiences))
    assert np.all((R >= 0) & (R <= 1))


# ------------------------------------------------------------------ merge methods


def _state_dicts():
    g = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(6, 5, generator=g), "b": torch.randn(6, generator=g)}
    tuned = [{k: v + torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(2)]
    return base, tuned


def _task_arithmetic_one_vector_is_the_fine_tune(base, tuned):
    merged = merge(base, tuned[:1], "task_arithmetic", scale=1.0)
    return all(torch.allclose(merged[k], tuned[0][k], atol=1e-6) for k in base)


def _mean_is_the_average(base, tuned):
    merged = merge(base, tuned, "mean")
    return all(torch.allclose(merged[k], (tuned[0][k] + tuned[1][k]) / 2, atol=1e-6) for k in base)


def _ties_dense_is_the_sign_elected_disjoint_mean(base, tuned):
    merged = merge(base, tuned, "ties", density=1.0, scale=1.0)
    for k in base:
        tv = np.stack([(t[k] - base[k]).numpy() for t in tuned]).astype(np.float64)
        agree = np.sign(tv) == np.sign(tv.sum(0))
        expected = (tv * agree).sum(0) / np.maximum(agree.sum(0), 1)
        if not np.allclose(merged[k].numpy() - base[k].numpy(), expected, atol=1e-5):
            return False
    return True


def _dare_drops_or_rescales_each_entry(base, tuned):
    merged = merge(base, tuned[:1], "dare", drop_rate=0.5, rescale=True, scale=1.0, seed=3)
    tv = torch.cat([(tuned[0][k] - base[k]).flatten() for k in base])
    out = torch.cat([(merged[k] - base[k]).flatten() for k in base])
    dropped = out.abs() < 1e-6
    kept = torch.isclose(out, 2 * tv, atol=1e-5)
    return bool((dropped | kept).all()) and bool(dropped.any()) and bool(kept.any())


def _adamerging_is_task_arithmetic_with_its_coefficients(base, tuned):
    g = torch.Generator().manual_seed(1)
    loaders = [[torch.randn(8, 5, generator=g)] for _ in tuned]
    result = get_method("adamerging").fn(
        base, tuned, forward=lambda sd, task, x: x @ sd["w"].T + sd["b"], loaders=loaders, steps=3, lr=0.1, batches=1
    )
    for k in base:
        c = result.coefficients[k]
        if not all(0 <= ck <= 1 for ck in c):
            return False
        expected = base[k] + sum(ck * (t[k] - base[k]) for ck, t in zip(c, tuned))
        if not torch.allclose(result.state_dict[k], expected, atol=1e-5):
            return False
    return len(result.entropy) == 3 and result.entropy[-1] <= result.entropy[0]


def _fisher_is_an_entrywise_convex_combination(base, tuned):
    loaders = [[torch.randn(8, 5, generator=torch.Generator().manual_seed(i))] for i in range(2)]
    merged = merge(base, tuned, "fisher", forward=lambda sd, task, x: x @ sd["w"].T + sd["b"], loaders=loaders)
    low, high = ({k: f(tuned[0][k], tuned[1][k]) for k in base} for f in (torch.minimum, torch.maximum))
    return all(bool(((merged[k] >= low[k] - 1e-6) & (merged[k] <= high[k] + 1e-6)).all()) for k in base)


def _regmean_with_shared_inputs_is_the_average(base, tuned):
    layer = torch.nn.Linear(5, 6)
    rename = [{"weight": m["w"], "bias": m["b"]} for m in (base, *tuned)]
    inputs = [torch.randn(16, 5, generator=torch.Generator().manual_seed(0))]
    merged = merge(rename[0], rename[1:], "regmean", model=layer, loaders=[inputs, inputs])
    return all(torch.allclose(merged[k], (rename[1][k] + rename[2][k]) / 2, atol=1e-5) for k in merged)


# merge method -> a property its merge of the tiny state dicts must have
MERGE_METHODS = {
    "task_arithmetic": _task_arithmetic_one_vector_is_the_fine_tune,
    "mean": _mean_is_the_average,
    "ties": _ties_dense_is_the_sign_elected_disjoint_mean,
    "dare": _dare_drops_or_rescales_each_entry,
    "adamerging": _adamerging_is_task_arithmetic_with_its_coefficients,
    "linear": lambda base, tuned: all(
        torch.allclose(merge(base, tuned, "linear", weights=[1.0, 3.0])[k], (tuned[0][k] + 3 * tuned[1][k]) / 4, atol=1e-6) for k in base
    ),
    "slerp": lambda base, tuned: all(
        torch.allclose(merge(base, tuned[:1], "slerp", t=t)[k], (base, tuned[0])[int(t)][k], atol=1e-6) for k in base for t in (0.0, 1.0)
    ),
    "multislerp": lambda base, tuned: all(torch.allclose(merge(base, tuned[:1], "multislerp")[k], tuned[0][k]) for k in base),
    "nuslerp": lambda base, tuned: all(torch.allclose(merge(base, tuned, "nuslerp", weights=[0.0, 1.0])[k], tuned[1][k]) for k in base),
    "karcher": lambda base, tuned: all(torch.allclose(merge(base, tuned[:1], "karcher")[k], tuned[0][k], atol=1e-6) for k in base),
    "model_stock": lambda base, tuned: all(
        torch.allclose(merge(base, [tuned[0]] * 2, "model_stock")[k], tuned[0][k], atol=1e-6) for k in base
    ),
    "breadcrumbs": lambda base, tuned: all(
        torch.allclose(merge(base, tuned, "breadcrumbs", density=1.0)[k], tuned[0][k] + tuned[1][k] - base[k], atol=1e-5) for k in base
    ),
    "della": lambda base, tuned: all(
        torch.allclose(merge(base, tuned, "della", density=1.0, consensus="sum")[k], tuned[0][k] + tuned[1][k] - base[k], atol=1e-5)
        for k in base
    ),
    "sce": lambda base, tuned: all(torch.allclose(merge(base, tuned[:1], "sce")[k], tuned[0][k], atol=1e-6) for k in base),
    "consensus": lambda base, tuned: all(
        torch.allclose(merge(base, tuned, "consensus", min_tasks=0, scale=1.0)[k], tuned[0][k] + tuned[1][k] - base[k], atol=1e-5)
        for k in base
    ),
    "emr": lambda base, tuned: all(torch.allclose(merge(base, tuned[:1], "emr", task=0)[k], tuned[0][k], atol=1e-6) for k in base),
    "iso_c": lambda base, tuned: torch.allclose(
        s := torch.linalg.svdvals(merge(base, tuned, "iso_c")["w"] - base["w"]), s.mean().expand_as(s), atol=1e-5
    ),
    "iso_cts": lambda base, tuned: torch.allclose(
        merge(base, tuned, "iso_cts", common_space_fraction=1.0)["w"], merge(base, tuned, "iso_c")["w"], atol=1e-5
    ),
    "lines": lambda base, tuned: all(
        torch.allclose(merge(base, tuned, "lines", beta=0.0)[k], (tuned[0][k] + tuned[1][k]) / 2, atol=1e-6) for k in base
    ),
    "tsv": lambda base, tuned: all(torch.allclose(merge(base, tuned[:1], "tsv")[k], tuned[0][k], atol=1e-5) for k in base),
    "nearswap": lambda base, tuned: all(torch.allclose(merge(base, tuned[:1], "nearswap", t=1e3)[k], tuned[0][k], atol=1e-6) for k in base),
    "ram": lambda base, tuned: all(torch.allclose(merge(base, tuned, "ram")[k], (tuned[0][k] + tuned[1][k]) / 2, atol=1e-6) for k in base),
    "ramplus_tl": lambda base, tuned: all(
        torch.allclose(merge(base, tuned, "ramplus_tl")[k], (tuned[0][k] + tuned[1][k]) / 2, atol=1e-6) for k in base
    ),
    "arcee_fusion": lambda base, tuned: all(
        bool(((m := merge(base, tuned[:1], "arcee_fusion")[k]) == base[k]).logical_or(torch.isclose(m, tuned[0][k], atol=1e-6)).all())
        for k in base
    ),
    "fisher": _fisher_is_an_entrywise_convex_combination,
    "regmean": _regmean_with_shared_inputs_is_the_average,
}

MERGE_MODELS = {"slerp": 1, "nearswap": 1, "arcee_fusion": 1}  # fine-tunes a method merges when it is defined for another count than two


def test_every_merge_method_has_a_smoke_check():
    missing = sorted({m.name for m in list_methods()} - set(MERGE_METHODS))
    assert not missing, f"registered merge methods without a smoke check in MERGE_METHODS: {missing}"


@pytest.mark.parametrize("name", [m.name for m in list_methods()])
def test_merge_method_merges_two_tiny_state_dicts(name):
    if name not in MERGE_METHODS:
        pytest.fail(f"merge method '{name}' is registered but has no smoke check: add it to MERGE_METHODS in {__file__}")
    base, tuned = _state_dicts()
    method = get_method(name)
    if method.scope == "tensor":
        merged = merge(base, tuned[: MERGE_MODELS.get(name, 2)], name)  # its defaults
        assert set(merged) == set(base)
        for k, v in merged.items():
            assert v.shape == base[k].shape and v.dtype == base[k].dtype and torch.isfinite(v).all(), k
    assert MERGE_METHODS[name](base, tuned), f"merge method '{name}' lost its defining property"
