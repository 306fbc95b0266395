"""Hostile and careless configs, plug-ins and result files: one line, exit 2, nothing silently wrong.

Families of issue 19: YAML that expands without bound or nests past the stack, duplicate keys,
files that are not UTF-8, booleans where numbers belong, plug-ins that exit or misspell a hook,
a sweep metric no run reports, damaged results for ``compare``/``report``, and closed pipes.
Each test failed on the code before the fix (a hang, a traceback, or a silent coercion).
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from clpeft import safe_yaml
from clpeft.cli import main

RUN = {
    "seed": 0,
    "scenario": {"name": "class_incremental", "dataset": "sklearn_digits", "n_experiences": 2},
    "backbone": {"name": "mlp", "hidden": [16]},
    "strategy": {"name": "finetune"},
    "train": {"epochs": 1, "batch_size": 64},
    "logging": {"tensorboard": False, "progress": "never"},
}


def _one_line_error(capsys, code) -> str:
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("clpeft: error: "), err
    return err


def _bomb(levels: int = 9) -> str:
    """A "billion laughs" document: 10 ** levels strings from a few hundred bytes."""
    lines = ['l0: &l0 ["lol","lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    lines += [f"l{i}: &l{i} [" + ",".join([f"*l{i - 1}"] * 10) + "]" for i in range(1, levels + 1)]
    return "\n".join(lines)


@pytest.mark.parametrize("command", ["validate", "run", "merge"])
def test_an_alias_bomb_is_refused_at_once_by_every_command(tmp_path, capsys, command):
    junk = "\n".join("    " + line for line in _bomb().splitlines())
    text = f"strategy:\n  name: finetune\n  junk:\n{junk}\n" if command != "merge" else f"method: mean\njunk:\n{junk}\n"
    path = tmp_path / "bomb.yaml"
    path.write_text(
        text
        + (
            "scenario: {name: class_incremental, dataset: sklearn_digits, n_experiences: 2}\nbackbone: {name: mlp}\n"
            if command != "merge"
            else ""
        )
    )
    argv = [command, str(path)] + (["--out", str(tmp_path / "o")] if command == "run" else [])
    start = time.perf_counter()
    err = _one_line_error(capsys, main(argv))
    assert time.perf_counter() - start < 5  # was: held a core until killed
    assert f"expands to more than {safe_yaml.MAX_VALUES:,} values through its aliases" in err


def test_aliases_within_the_bound_still_work():
    assert safe_yaml.load_yaml("a: &x [1, 2]\nb: *x\nc: {<<: {k: 1}, k: 2}", "f") == {"a": [1, 2], "b": [1, 2], "c": {"k": 2}}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[" * 3000 + "]" * 3000, "nested too deeply to read"),
        ("a: &x [1, *x]", "c.yaml:1: an anchor refers to itself"),
        (
            "strategy: {name: finetune}\ntrain: {lr: 0.1}\ntrain: {lr: 0.2}\n",
            "c.yaml:3:1: duplicate key 'train' (first given on line 2); the later value would silently win",
        ),
        ("train:\n  lr: 0.1\n  epochs: 2\n  lr: 0.3\n", "c.yaml:4:3: duplicate key 'lr' (first given on line 2)"),
    ],
)
def test_yaml_that_walks_past_the_stack_or_repeats_a_key_is_one_line(tmp_path, capsys, text, message):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    err = _one_line_error(capsys, main(["validate", str(path)]))
    assert message in err


@pytest.mark.parametrize("content", [b"\x89PNG\r\n\x1a\n\x00\x00", "strategy: {name: caf\xe9}\n".encode("latin-1")])
def test_a_config_that_is_not_utf8_text_is_one_line(tmp_path, capsys, content):
    path = tmp_path / "c.yaml"
    path.write_bytes(content)
    err = _one_line_error(capsys, main(["validate", str(path)]))
    assert f"{path}: not UTF-8 text (byte 0x" in err and "is it a YAML config?" in err


@pytest.mark.parametrize(
    ("override", "where"),
    [
        ("train.epochs=true", "train.epochs"),
        ("strategy={name: replay, mem_size: true}", "strategy.mem_size"),
        ("backbone.hidden=[16, false]", "backbone.hidden[1]"),
        ("train.lr=true", "train.lr"),
    ],
)
def test_a_boolean_is_never_read_as_a_number(tmp_path, capsys, override, where):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(RUN))
    err = _one_line_error(capsys, main(["validate", str(path), "--set", override]))
    assert f"{where}: expected a number, got the boolean" in err


def test_booleans_stay_accepted_where_the_field_takes_them(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(RUN))
    assert (
        main(["validate", str(path), "--set", "train.amp=off", "--set", "logging.tensorboard=true", "--set", "backbone.freeze=true"]) == 0
    )


def test_an_empty_section_takes_set_overrides(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({k: v for k, v in RUN.items() if k != "train"}) + "train:\n")
    assert main(["validate", str(path), "--set", "train.lr=0.2"]) == 0  # was: 'train' is not a section


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("import sys\nsys.exit(0)\n", "plug.py:2: it called sys.exit(0) while being imported"),
        (
            "from clpeft import Strategy\n\nclass Mine(Strategy):\n    def after_experiment(self, exp):\n        pass\n",
            "plug.py:3: TypeError while importing it: Mine defines ['after_experiment'], which the engine never calls",
        ),
        ("raise RuntimeError('boom')\n", "plug.py:1: RuntimeError while importing it: boom"),
    ],
)
def test_a_plug_in_that_exits_or_fails_on_import_is_one_line(tmp_path, capsys, source, message):
    (tmp_path / "plug.py").write_text(source)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({**RUN, "strategy": {"name": "plug.py:Mine"}}))
    err = _one_line_error(capsys, main(["validate", str(path)]))  # sys.exit(0) made validate exit 0 silently
    assert message in err


def test_a_sweep_metric_no_run_reports_is_refused_before_training(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(RUN))
    err = _one_line_error(
        capsys, main(["sweep", str(path), "--grid", "train.lr=[0.1,0.2]", "--metric", "acc_lats", "--out", str(tmp_path / "sw")])
    )
    assert "--metric acc_lats: not a scalar metric of a class_incremental run (acc_final, acc_last," in err
    assert err.endswith("; did you mean 'acc_last'?\n")
    assert not (tmp_path / "sw").exists()  # nothing trained


def test_a_sweep_over_online_runs_may_pick_a_auc_and_others_may_not(tmp_path, capsys):
    """A_auc exists only for online streams: the early check knows which runs report it."""
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(RUN))
    err = _one_line_error(
        capsys, main(["sweep", str(path), "--grid", "train.lr=[0.1]", "--metric", "a_auc", "--out", str(tmp_path / "sw")])
    )
    assert "--metric a_auc: not a scalar metric of a class_incremental run" in err
    from clpeft import config
    from clpeft.tools.sweep import _check_metric

    online = config.load(Path(__file__).resolve().parents[1] / "configs" / "online" / "digits_blurry_replay.yaml")
    _check_metric("a_auc", online)  # accepted: no error


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("finished")
    (tmp / "c.yaml").write_text(yaml.safe_dump(RUN))
    assert main(["run", str(tmp / "c.yaml"), "--out", str(tmp / "run")]) == 0
    return tmp / "run"


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda run: (run / "metrics.json").write_text((run / "metrics.json").read_text()[:50]), "metrics.json: not valid JSON (line"),
        (lambda run: (run / "metrics.json").write_bytes(b"\xff\xfe\x00binary"), "metrics.json: not UTF-8 text"),
        (lambda run: (run / "metrics.json").write_text("[1, 2]"), "metrics.json: not a clpeft results file (no acc_matrix, metrics)"),
        (lambda run: (run / "config.yaml").write_text("seed: [1\n"), "config.yaml:2:1: malformed YAML"),
    ],
)
@pytest.mark.parametrize("command", ["compare", "report"])
def test_damaged_result_files_are_one_line_for_compare_and_report(tmp_path, finished_run, capsys, damage, message, command):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    damage(run)
    err = _one_line_error(capsys, main([command, str(run)]))
    assert message in err


def test_compare_csv_into_a_directory_is_one_line(finished_run, tmp_path, capsys):
    err = _one_line_error(capsys, main(["compare", str(finished_run), "--csv", str(tmp_path)]))
    assert f"{tmp_path}: Is a directory; a file was expected here, not a directory" in err


def test_a_closed_pipe_ends_compare_quietly(finished_run):
    reader = subprocess.Popen(
        [sys.executable, "-m", "clpeft", "compare", str(finished_run), str(finished_run)], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    reader.stdout.close()  # what `| head -0` does
    err = reader.stderr.read().decode()
    assert reader.wait(timeout=120) == 141 and "Traceback" not in err and "BrokenPipe" not in err, err


def test_every_mistake_of_a_config_is_reported_in_one_run(tmp_path, capsys):
    """Issue 20: validate reported only the first problem and '(+1 more)'; now each on its own line."""
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({**RUN, "backbone": {"name": "mlp", "widht": 3}, "train": {"lr": -1, "epochs": 0}, "evalu": {}}))
    assert main(["validate", str(path)]) == 2
    lines = capsys.readouterr().err.splitlines()
    assert lines == [
        "clpeft: error: evalu: unknown section; did you mean 'eval'?; sections are seed, seeds, scenario, backbone, "
        "strategy, train, eval, logging, out",
        "clpeft: error: backbone.widht: unknown key; did you mean 'weights'?; known keys: hidden, freeze, scale, weights",
        "clpeft: error: train.epochs: input should be greater than or equal to 1, got 0",
        "clpeft: error: train.lr: input should be greater than 0, got -1",
    ]


def test_switching_the_strategy_by_set_drops_the_old_strategys_keys_with_a_notice(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({**RUN, "strategy": {"name": "replay", "mem_size": 20, "policy": "reservoir"}}))
    assert main(["validate", str(path), "--set", "strategy.name=finetune"]) == 0  # was: unknown key mem_size
    assert (
        "clpeft: note: strategy.name changed from replay: dropped its keys mem_size, policy (set the whole section "
        "to keep control: --set 'strategy={name: ...}')"
    ) in capsys.readouterr().err
    # a key that belongs to neither strategy is still an error, and without --set nothing is dropped
    path.write_text(yaml.safe_dump({**RUN, "strategy": {"name": "replay", "mem_sise": 20}}))
    assert main(["validate", str(path), "--set", "strategy.name=finetune"]) == 2
    assert "strategy.mem_sise: unknown key" in capsys.readouterr().err
    path.write_text(yaml.safe_dump({**RUN, "strategy": {"name": "finetune", "mem_size": 20}}))
    assert main(["validate", str(path)]) == 2
    assert "strategy.mem_size: unknown key" in capsys.readouterr().err


def test_feature_cache_on_names_what_yaml_did(tmp_path, capsys):
    """Issue 21: ``feature_cache: on`` was reported as "got 'auto'" (YAML's on is true, mapped as amp's)."""
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(RUN) + "")
    assert main(["validate", str(path), "--config-only", "--set", "train.feature_cache=on"]) == 2
    err = capsys.readouterr().err
    assert "train.feature_cache: value error, YAML reads on/yes/true as a boolean; write disk, memory or off" in err
    assert main(["validate", str(path), "--config-only", "--set", "train.amp=on"]) == 0  # amp: on means auto
