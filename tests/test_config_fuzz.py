"""Hostile configs (hypothesis): `clpeft validate` / `clpeft run` succeed or exit 2 with one line.

Each case starts from a tiny valid digits + mlp run and applies one to three mutations: wrong
types, unknown keys at every level, absurd values (negative sizes, zero or too many
experiences, ``init_classes`` beyond the class count, non-finite or huge numbers, huge batch
sizes), misspelled or missing strategy/scenario/backbone names and plug-in paths that do not
exist. The property: the CLI returns 0, or returns 2 and prints exactly one line
``clpeft: error: <key>: ...`` whose key is in a section the case changed — never a traceback.
``run`` may also return 1 with the one-line non-finite-loss message (a diverged run).

Each test prints how many cases it tried and how they ended (visible with ``-rA`` / ``-s``).
The fast tests draw a fixed (derandomised) sample; ``-m slow`` runs many more random cases.
"""

from __future__ import annotations

import contextlib
import copy
import io
import json
import re
import tempfile
import warnings
from collections import Counter
from pathlib import Path

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clpeft import config, registry
from clpeft.cli import main

BASE = {
    "seed": 0,
    "scenario": {"name": "class_incremental", "dataset": "sklearn_digits", "n_experiences": 2, "train_per_class": 6, "test_per_class": 3},
    "backbone": {"name": "mlp", "hidden": [16]},
    "strategy": {"name": "finetune"},
    "train": {"epochs": 1, "batch_size": 16, "lr": 0.05, "feature_cache": "off"},
    "logging": {"tensorboard": False, "progress": "never"},
}
ERROR = re.compile(r"^clpeft: error: (?P<section>[A-Za-z_]\w*)(\[\d+\])?(\.[^\s:]+)*: \S")

# --------------------------------------------------------------------------- values


def _identifiers():
    return st.from_regex(r"[a-z_][a-z0-9_]{0,9}", fullmatch=True)


JUNK = st.one_of(
    st.none(),
    st.booleans(),
    st.text(max_size=6),
    _identifiers(),
    st.integers(-5, 30),
    st.sampled_from([-(2**63) - 1, -1, 0, 2**31, 2**62, 2**63, 10**30]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([float("nan"), float("inf"), -float("inf"), 1e300, -0.0]),
    st.lists(st.integers(-3, 12), max_size=11),
    st.dictionaries(_identifiers(), st.integers(-2, 5), max_size=2),
)
MISSPELT = ["replya", "finetun", "lwff", "class_incremntal", "mlpp", "tim", "", " ", "REPLAY"]
MISSING_PLUGINS = [
    "no/such/dir/plug.py:Thing",
    "plug_missing.py:Thing",
    "no_such_module_qq:Thing",
    "clpeft.no_such_module:Thing",
    ":Thing",
    "x.py:",
    "a:b:c",
    "..rel:Thing",
    "os:path",
    "json:JSONDecoder",
    "clpeft.strategies.replay:NoSuchClass",
    "clpeft.strategy:Strategy.x",
]


def _names(reg) -> list[str]:
    return reg.names()


FEW_SHOT = "few_shot_class_incremental"


def _few_shot(runnable: bool):
    """A whole few-shot scenario section with absurd counts (k_shot beyond the ~180 digits per class)."""
    return st.fixed_dictionaries(
        {
            "name": st.just(FEW_SHOT),
            "dataset": st.sampled_from(["sklearn_digits", "sklearn_digitz"]),
            "n_base": st.integers(-1, 12),
            "n_way": st.integers(-1, 12),
            "k_shot": st.one_of(st.integers(-1, 6), st.sampled_from([150, 500, 10**6])),
            "n_sessions": st.one_of(st.none(), st.integers(-1, 12)),
            "base_per_class": st.one_of(st.none(), st.integers(-1, 6)) if runnable else st.one_of(st.none(), st.integers(-1, 10**4)),
            "test_per_class": st.integers(-1, 3),
            # an integer class_order seeds numpy, which takes 0..2**32-1 (see test_known_gaps below)
            "class_order": st.one_of(st.none(), st.integers(0, 2**32 - 1), st.lists(st.integers(-1, 10), max_size=10)),
        }
    )


def _absurd(runnable: bool):
    """(path, value) pairs aimed at the checks a sloppy validator would miss."""
    small = st.integers(-3, 3 if runnable else 10**6)
    choices = [
        st.tuples(st.just("scenario.n_experiences"), st.integers(-3, 25)),
        st.tuples(st.just("scenario.init_classes"), st.one_of(st.none(), st.integers(-3, 15))),
        st.tuples(st.just("scenario.train_per_class"), st.one_of(st.none(), st.integers(-3, 8))),
        st.tuples(st.just("scenario.test_per_class"), st.one_of(st.none(), st.integers(-3, 4))),
        st.tuples(
            st.just("scenario.class_order"),
            st.one_of(
                st.permutations(range(10)),
                st.lists(st.integers(-2, 12), max_size=12),
                # an integer order seeds numpy, which takes 0..2**32-1 (see test_known_gaps below)
                st.integers(0, 2**32 - 1),
            ),
        ),
        st.tuples(st.just("scenario.dataset"), st.sampled_from(["sklearn_digits", "fashion_mnsit", "", "digits"])),
        st.tuples(st.just("train.batch_size"), st.sampled_from([0, -1, 1, 7, 10**9, 2**62, 2**63, 2**80])),
        st.tuples(st.just("eval.batch_size"), st.sampled_from([0, -4, 1, 10**9, 2**62, 2**64])),
        st.tuples(
            st.just("train.lr"),
            st.one_of(
                st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0.0, -0.1, 1e-12, 1e30, 1e31, 1e300, "nan", "inf", "0.1"])
            ),
        ),
        st.tuples(st.just("train.momentum"), st.sampled_from([-0.1, 1.0, 0.99, float("nan")])),
        st.tuples(st.just("train.weight_decay"), st.sampled_from([-1.0, 1e7, float("inf"), 0.0])),
        st.tuples(st.just("train.epochs"), st.integers(-2, 2 if runnable else 10**12)),
        st.tuples(st.just("train.num_workers"), st.integers(-2, 10**6)),
        st.tuples(st.just("logging.keep_checkpoints"), small),
        st.tuples(st.just("seed"), st.sampled_from([-1, 0, 7, 2**63 - 1, 2**63, 2**70, 1.5, "1"])),
        st.tuples(st.just("seeds"), st.one_of(st.lists(st.integers(-2, 4), max_size=2 if runnable else 6), JUNK)),
        st.tuples(st.just("backbone.hidden"), st.lists(st.integers(-4, 32 if runnable else 10**7), max_size=3)),
        st.tuples(st.just("backbone.scale"), st.one_of(st.floats(0.5, 1e4), st.sampled_from([float("nan"), float("inf"), "x"]))),
        st.tuples(st.just("strategy.mem_size"), st.integers(-5, 10**6)),
        st.tuples(st.just("strategy.name"), st.sampled_from(_names(registry.strategies) + MISSPELT + MISSING_PLUGINS)),
        st.tuples(st.just("scenario.name"), st.sampled_from(["class_incremental", "avalanche"] + MISSPELT + MISSING_PLUGINS)),
        st.tuples(
            st.just("backbone.name"),
            st.sampled_from(["mlp", "cnn", "text_encoder"] + MISSPELT + MISSING_PLUGINS + ([] if runnable else ["timm", "causal_lm"])),
        ),
        st.tuples(st.just("backbone.model"), st.sampled_from(["no_such_timm_model", 3])),
    ]
    choices.append(st.tuples(st.just("scenario"), _few_shot(runnable)))
    return st.one_of(*choices)


def _known_paths() -> list[str]:
    """Every key a user may legitimately write in the base config's sections."""
    paths = ["seed", "seeds", "out"]
    for section, model in config._FIXED.items():
        paths += [f"{section}.{f}" for f in model.model_fields]
    for section, reg, name in (
        ("scenario", registry.scenarios, "class_incremental"),
        ("backbone", registry.backbones, "mlp"),
        ("strategy", registry.strategies, "replay"),
    ):
        paths += [f"{section}.{f}" for f in config.schema_of(reg.get(name), section).model_fields]
    return sorted(set(paths))


SECTION_NAMES = list(config.SECTIONS)


def _mutation(runnable: bool):
    wrong_type = st.tuples(st.sampled_from(_known_paths()), JUNK)
    unknown_key = st.tuples(
        st.builds(lambda s, k: f"{s}.{k}" if s else k, st.sampled_from(["", *SECTION_NAMES[2:7]]), _identifiers()),
        JUNK,
    )
    whole_section = st.tuples(st.sampled_from(SECTION_NAMES), JUNK)
    return st.one_of(wrong_type, unknown_key, whole_section, _absurd(runnable), _absurd(runnable))


def _apply(cfg: dict, path: str, value) -> None:
    *parents, leaf = path.split(".")
    node = cfg
    for part in parents:
        if not isinstance(node.get(part), dict):
            node[part] = {}
        node = node[part]
    node[leaf] = value


# --------------------------------------------------------------------------- the property

TALLY: dict[str, Counter] = {"validate": Counter(), "run": Counter()}


def _cli(args: list[str]) -> tuple[int, str]:
    """``main(args)`` in this process; stderr and Python warnings as they would reach a terminal."""
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code = main(args)
    lines = err.getvalue() + "".join(f"warning: {w.message}\n" for w in caught)
    return code, lines


def _check_case(mode: str, mutations: list[tuple[str, object]]) -> None:
    cfg = copy.deepcopy(BASE)
    for path, value in mutations:
        _apply(cfg, path, value)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "case.yaml"
        path.write_text(yaml.safe_dump(cfg))
        args = (
            ["validate", str(path), "--config-only"] if mode == "validate" else ["run", str(path), "--out", f"{tmp}/run", "--device", "cpu"]
        )
        try:
            code, err = _cli(args)
        except BaseException as exc:  # what the user would see as a traceback
            raise AssertionError(f"traceback for {mutations!r}: {type(exc).__name__}: {exc}") from exc
        if code == 0:
            TALLY[mode]["ok"] += 1
            if mode == "run":
                seeds = cfg.get("seeds") or [None]  # a `seeds` list gives one run directory per seed
                for seed in seeds:
                    run_dir = Path(tmp) / "run" / (f"seed_{seed}" if seed is not None else "")
                    result = json.loads((run_dir / "metrics.json").read_text())
                    T = len(result["acc_matrix"])
                    assert T >= 1 and all(len(row) == T and all(0 <= a <= 1 for a in row) for row in result["acc_matrix"])
            return
        lines = err.splitlines()
        assert err.endswith("\n") and lines, f"{mutations!r}: stderr:\n{err}"
        if code == 1 and mode == "run" and "non-finite loss" in err:
            assert len(lines) == 1, f"{mutations!r}: a stopped run is one line:\n{err}"
            TALLY[mode]["diverged (exit 1)"] += 1
            return
        assert code == 2, f"{mutations!r}: exit {code}: {err}"
        changed = {p.split(".")[0] for p, _ in mutations}
        allowed = changed if mode == "validate" else changed | set(SECTION_NAMES)  # a run also checks across sections
        for line in lines:  # every mistake on a line of its own, each naming what changed
            match = ERROR.match(line + "\n")
            assert match, f"{mutations!r}: an error line does not start with a key path: {line}"
            assert match["section"] in allowed, f"{mutations!r}: the error names '{match['section']}', not what changed: {line}"
        TALLY[mode]["rejected (exit 2)"] += 1


def _report(mode: str) -> None:
    tally = TALLY[mode]
    print(
        f"\nconfig fuzz ({mode}): {sum(tally.values())} cases tried: "
        + ", ".join(f"{n} {k}" for k, n in sorted(tally.items()))
        + "; no traceback, every problem one line naming its key"
    )


FUZZ = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture], database=None)


def _validate_case(mutations):
    _check_case("validate", mutations)


def _run_case(mutations):
    _check_case("run", mutations)


MUTATIONS_VALIDATE = st.lists(_mutation(runnable=False), min_size=1, max_size=3)
MUTATIONS_RUN = st.lists(_mutation(runnable=True), min_size=1, max_size=2)


def test_fuzz_validate():
    TALLY["validate"].clear()
    settings(max_examples=200, derandomize=True, **FUZZ)(given(MUTATIONS_VALIDATE)(_validate_case))()
    _report("validate")
    assert TALLY["validate"]["rejected (exit 2)"] > 100  # most cases really are hostile


def test_fuzz_run():
    TALLY["run"].clear()
    settings(max_examples=16, derandomize=True, **FUZZ)(given(MUTATIONS_RUN)(_run_case))()
    _report("run")
    assert TALLY["run"]["rejected (exit 2)"] > 0


@pytest.mark.slow
def test_fuzz_validate_many():
    TALLY["validate"].clear()
    settings(max_examples=5000, **FUZZ)(given(MUTATIONS_VALIDATE)(_validate_case))()
    _report("validate")


@pytest.mark.slow
def test_fuzz_run_many():
    TALLY["run"].clear()
    settings(max_examples=300, **FUZZ)(given(MUTATIONS_RUN)(_run_case))()
    _report("run")


# --------------------------------------------------------------------------- hand-picked cases

ABSURD = [
    ("scenario.n_experiences", 0, "scenario.n_experiences: expected at least 1 experience"),
    ("scenario.n_experiences", -2, "scenario.n_experiences: expected at least 1 experience"),
    ("scenario.n_experiences", 11, "scenario.n_experiences: 11 experiences but 'sklearn_digits' has only 10 classes"),
    ("scenario.init_classes", 12, "scenario.init_classes: must be between 1 and 10"),
    ("scenario.train_per_class", -1, "scenario.train_per_class: input should be greater than or equal to 1"),
    ("train.batch_size", -3, "train.batch_size: input should be greater than or equal to 1"),
    ("train.batch_size", 2**64, "train.batch_size: 18446744073709551616 does not fit in a 64-bit integer"),
    ("train.lr", float("nan"), "train.lr: expected a finite number"),
    ("train.lr", float("inf"), "train.lr: expected a finite number"),
    ("train.lr", "nan", "train.lr: input should be a finite number"),
    ("train.lr", 1e31, "train.lr: value error, at most 1e30"),
    ("train.weight_decay", 1e300, "train.weight_decay: expected a finite number of magnitude at most"),
    ("strategy.alpha", float("nan"), "strategy.alpha: expected a finite number"),
    ("strategy.mem_size", -1, "strategy.mem_size: input should be greater than or equal to 0"),
    ("seed", -1, "seed: expected an integer from 0 to 2**63 - 1, got -1"),
    ("seed", 2**63, "seed: 9223372036854775808 does not fit in a 64-bit integer"),
    ("strategy.name", ":Thing", "strategy.name: expected 'package.module:Class' or 'path/file.py:Class', got ':Thing'"),
    (
        "strategy.name",
        "json:JSONDecoder",
        "strategy.name: json:JSONDecoder is not a strategy: JSONDecoder must subclass clpeft.strategy.Strategy",
    ),
    ("backbone.name", "clpeft.strategies.replay:Replay", "backbone.name: clpeft.strategies.replay:Replay is not a backbone"),
    ("strategy.name", "..rel:Thing", "strategy.name: cannot import module '..rel'"),
    ("train.bogus", 1, "train.bogus: unknown key"),
    ("strategy.bogus", 1, "strategy.bogus: unknown key"),
    ("bogus", 1, "bogus: unknown section"),
]


@pytest.mark.parametrize("path,value,message", ABSURD, ids=[f"{p}={v!r}"[:40] for p, v, _ in ABSURD])
def test_absurd_value_is_one_line_naming_the_key(path, value, message):
    cfg = copy.deepcopy(BASE)
    if path.startswith("strategy.") and path != "strategy.name":
        cfg["strategy"]["name"] = "lwf" if path == "strategy.alpha" else "replay"
    _apply(cfg, path, value)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "c.yaml").write_text(yaml.safe_dump(cfg))
        code, err = _cli(["validate", f"{tmp}/c.yaml"])
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"clpeft: error: {message}"), err


def test_values_at_the_edge_of_the_ranges_are_accepted_and_run():
    """The bounds reject only what cannot run: the largest accepted values still run."""
    cfg = copy.deepcopy(BASE)
    assert config.resolve({**cfg, "seeds": [0, 2**63 - 1]}).seeds == [0, 2**63 - 1]
    cfg["seed"] = 2**63 - 1
    cfg["train"].update(batch_size=2**62, lr=1e-30)
    cfg["eval"] = {"batch_size": 2**62}
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "c.yaml").write_text(yaml.safe_dump(cfg))
        code, err = _cli(["run", f"{tmp}/c.yaml", "--out", f"{tmp}/run", "--device", "cpu"])
        assert code == 0, err
        result = json.loads((Path(tmp) / "run" / "metrics.json").read_text())
    assert len(result["acc_matrix"]) == 2


@pytest.mark.parametrize(
    "changes,message",
    [
        ({"k_shot": 500}, "scenario.k_shot: class"),  # digits have fewer than 500 images per class
        ({"n_base": 11}, "scenario.n_base: the dataset has only 10 classes"),
        ({"n_sessions": 4}, "scenario.n_sessions: 4 base + 4 x 2 classes exceed the 10 classes"),
    ],
    ids=["k_shot>per-class", "n_base>classes", "sessions>classes"],
)
def test_few_shot_counts_beyond_the_data_are_one_line(changes, message):
    cfg = copy.deepcopy(BASE)
    cfg["scenario"] = {
        "name": FEW_SHOT,
        "dataset": "sklearn_digits",
        "n_base": 4,
        "n_way": 2,
        "k_shot": 5,
        "base_per_class": 5,
        "test_per_class": 3,
        **changes,
    }
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "c.yaml").write_text(yaml.safe_dump(cfg))
        code, err = _cli(["run", f"{tmp}/c.yaml", "--out", f"{tmp}/run", "--device", "cpu"])
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"clpeft: error: {message}"), err


# --------------------------------------------------------------------------- values found by fuzzing
# Each once crashed with a traceback or a misleading message; now each exits 2 naming the key.

FOUND_BY_FUZZING = [
    # scenarios/class_incremental.py: an integer class_order seeds numpy's RandomState (0..2**32-1): ValueError
    ({"scenario.class_order": -1}, "scenario.class_order"),
    # scenarios/few_shot_class_incremental.py: the same for its integer class_order
    (
        {"scenario": {"name": FEW_SHOT, "dataset": "sklearn_digits", "n_base": 4, "n_way": 2, "k_shot": 5, "class_order": -3}},
        "scenario.class_order",
    ),
    # strategies/lwf.py: temperature divides the logits; 0 gives NaN (exit 1 'lower train.lr', misleading)
    ({"strategy.name": "lwf", "strategy.temperature": 0.0}, "strategy.temperature"),
    # clpeft/backbones/mlp.py: scale divides the inputs; 0 gives NaN (exit 1, misleading)
    ({"backbone.scale": 0.0}, "backbone.scale"),
    # clpeft/backbones/mlp.py (or the engine's build step): a width that cannot be allocated: RuntimeError
    ({"backbone.hidden": [10**12]}, "backbone.hidden"),
    # scenarios/avalanche_stream.py: a relative module name: TypeError from importlib
    ({"scenario": {"name": "avalanche", "benchmark": "..x:y"}}, "scenario.benchmark"),
    # scenarios/avalanche_stream.py: a callable that does not return a benchmark: AttributeError
    ({"scenario": {"name": "avalanche", "benchmark": "os:getcwd"}}, "scenario.benchmark"),
]


@pytest.mark.parametrize("changes,key", FOUND_BY_FUZZING, ids=[str(g[0])[:40] for g in FOUND_BY_FUZZING])
def test_values_found_by_fuzzing_name_their_key(changes, key):
    cfg = copy.deepcopy(BASE)
    for path, value in changes.items():
        _apply(cfg, path, value)
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "c.yaml").write_text(yaml.safe_dump(cfg))
        code, err = _cli(["run", f"{tmp}/c.yaml", "--out", f"{tmp}/run", "--device", "cpu"])
    assert code == 2 and err.startswith(f"clpeft: error: {key}: "), err


def test_the_few_shot_scenario_the_fuzzing_relies_on_is_registered():
    """The few-shot cases above were skipped silently when the scenario was missing; now its absence fails."""
    assert FEW_SHOT in registry.scenarios.names()
