"""Config validation: every user mistake is one line naming the key path, exit code 2."""

from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from clpeft import config
from clpeft.cli import main
from clpeft.errors import UserError


def _write(tmp_path, data, name="run.yaml"):
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def _set(d, dotted, value):
    *parents, leaf = dotted.split(".")
    for p in parents:
        d = d.setdefault(p, {})
    if value is _DELETE:
        d.pop(leaf)
    else:
        d[leaf] = value


_DELETE = object()

MALFORMED = [
    # (change to the valid config, text the one-line error must contain)
    ("trian", {"epochs": 1}, "trian: unknown section; did you mean 'train'?"),
    ("strategy.name", "replya", "strategy.name: unknown strategy 'replya'; did you mean 'replay'?"),
    ("scenario.name", "class_incremntal", "scenario.name: unknown scenario 'class_incremntal'; did you mean 'class_incremental'?"),
    ("backbone.name", "mlpp", "backbone.name: unknown backbone 'mlpp'; did you mean 'mlp'?"),
    ("train.epochs", "three", "train.epochs: input should be a valid integer"),
    ("train.optimizer", "adamm", "train.optimizer: input should be 'sgd', 'adam' or 'adamw'"),
    ("train.batch_size", 0, "train.batch_size: input should be greater than or equal to 1"),
    ("scenario.n_experiences", _DELETE, "scenario.n_experiences: missing required value"),
    ("scenario.n_experiences", 3, "scenario.n_experiences: 10 classes do not split into 3 equal experiences"),
    ("scenario.n_experiences", 11, "scenario.n_experiences: 11 experiences but 'sklearn_digits' has only 10 classes"),
    ("scenario.dataset", "fashion_mnsit", "scenario.dataset: unknown dataset 'fashion_mnsit'; did you mean 'fashion_mnist'?"),
    ("scenario.class_order", [0, 1, 2], "scenario.class_order: must be a permutation of 0..9"),
    ("strategy.mem_sise", 10, "strategy.mem_sise: unknown key; did you mean 'mem_size'?"),
    ("strategy.name", "missing_file.py:Thing", "strategy.name: plug-in file not found: missing_file.py"),
    ("strategy.name", "no_such_module_xyz:Thing", "strategy.name: cannot import module 'no_such_module_xyz'"),
    ("seed", "zero", "seed: expected an integer"),
    ("seeds", [], "seeds: expected a non-empty list of integers"),
    ("seeds", 3, "seeds: expected a non-empty list of integers"),
    ("seeds", [0, -1], "seeds[1]: expected an integer from 0 to 2**63 - 1, got -1"),
    ("seeds", [0, "one"], "seeds[1]: expected an integer from 0 to 2**63 - 1, got 'one'"),
    ("seeds", [0, True], "seeds[1]: expected an integer from 0 to 2**63 - 1, got True"),
    ("seeds", [3, 1, 3], "seeds: 3 appears more than once"),
    ("logging.progress", "sometimes", "logging.progress: input should be 'auto', 'always' or 'never'"),
]


@pytest.mark.parametrize("key,value,message", MALFORMED, ids=[m[0] + "=" + str(m[1])[:12] for m in MALFORMED])
def test_malformed_config_is_one_line_exit_2(tmp_path, capsys, digits_run, key, value, message):
    digits_run["strategy"] = {"name": "replay"}
    _set(digits_run, key, value)
    code = main(["validate", str(_write(tmp_path, digits_run))])
    err = capsys.readouterr().err
    assert code == 2
    assert err.count("\n") == 1, err
    assert message in err, err


def test_valid_config_passes_and_fills_defaults(tmp_path, capsys, digits_run):
    assert main(["validate", str(_write(tmp_path, digits_run))]) == 0
    cfg = config.load(_write(tmp_path, digits_run))
    resolved = cfg.to_dict()
    assert resolved["train"]["optimizer"] == "sgd" and resolved["eval"]["batch_size"] == 256
    assert resolved["scenario"]["init_classes"] is None
    assert config.resolve(resolved).to_dict() == resolved  # the resolved config round-trips


def test_seeds_default_none_and_round_trip(tmp_path, digits_run):
    assert config.load(_write(tmp_path, digits_run)).to_dict()["seeds"] is None
    digits_run["seeds"] = [2, 0, 7]
    cfg = config.load(_write(tmp_path, digits_run))
    assert cfg.seeds == [2, 0, 7]  # order kept as written
    resolved = cfg.to_dict()
    assert resolved["seeds"] == [2, 0, 7]
    assert config.resolve(resolved).to_dict() == resolved
    assert config.load(_write(tmp_path, digits_run), ["seeds=[5]"]).seeds == [5]


def test_malformed_yaml_names_line_and_column(tmp_path, capsys):
    path = _write(tmp_path, "seed: 0\nscenario: {name: class_incremental\ntrain: [1, 2\n")
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{path}:3:" in err and "malformed YAML" in err


def test_missing_file(tmp_path, capsys):
    assert main(["validate", str(tmp_path / "nope.yaml")]) == 2
    assert "config file not found" in capsys.readouterr().err


def test_set_overrides_coerce_types(tmp_path, digits_run):
    digits_run["strategy"] = {"name": "replay"}
    path = _write(tmp_path, digits_run)
    cfg = config.load(path, ["train.lr=0.5", "strategy.mem_size=50", "train.amp=off", "scenario.class_order=[9,8,7,6,5,4,3,2,1,0]"])
    assert cfg.train.lr == 0.5 and isinstance(cfg.train.lr, float)
    assert cfg.strategy.params["mem_size"] == 50
    assert cfg.scenario.params["class_order"] == [9, 8, 7, 6, 5, 4, 3, 2, 1, 0]
    with pytest.raises(UserError, match="train.epochs: input should be a valid integer"):
        config.load(path, ["train.epochs=abc"])
    with pytest.raises(UserError, match="expects key.sub=value"):
        config.load(path, ["train.epochs"])
    with pytest.raises(UserError, match="'train.lr' is not a section"):
        config.load(path, ["train.lr.x=1"])


def test_cli_error_has_no_traceback(tmp_path, digits_run):
    digits_run["strategy"]["name"] = "replya"
    proc = subprocess.run(
        [sys.executable, "-m", "clpeft", "validate", str(_write(tmp_path, digits_run))],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "clpeft: error: strategy.name: unknown strategy 'replya'; did you mean 'replay'? "
        "(run 'clpeft list' to see them all, or give 'module:Class' / 'file.py:Class')"
    ]
