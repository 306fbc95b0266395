"""Run directories under faults: one owner at a time, nothing overwritten, nothing lost.

Families of issue 19: two runs on one ``--out``; ``--out`` naming the current directory, a
file, or a directory of someone else's files; ``--resume --force`` with a change the
checkpoints cannot take; a full disk or a file where ``checkpoints/`` should be. Each test
failed on the code before the fix (runs mixed silently, files overwritten, or a traceback
after ``config.yaml`` had already been replaced).
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys

import pytest
import yaml

from clpeft import checkpoint
from clpeft.cli import main
from clpeft.run_directory import RunLock

RUN = {
    "seed": 0,
    "scenario": {"name": "class_incremental", "dataset": "sklearn_digits", "n_experiences": 3, "init_classes": 4},
    "backbone": {"name": "mlp", "hidden": [16]},
    "strategy": {"name": "finetune"},
    "train": {"epochs": 1, "batch_size": 64},
    "logging": {"tensorboard": False, "progress": "never", "keep_checkpoints": 3},
}


def _config(tmp_path, **changes) -> str:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({**RUN, **changes}))
    return str(path)


def _one_line_error(capsys, code) -> str:
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and err.startswith("clpeft: error: "), err
    return err


def _matrix(run_dir):
    return json.loads((run_dir / "metrics.json").read_text())["acc_matrix"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The accuracy matrix of an uninterrupted run of :data:`RUN`."""
    tmp = tmp_path_factory.mktemp("reference")
    assert main(["run", _config(tmp), "--out", str(tmp / "run")]) == 0
    return _matrix(tmp / "run")


def test_a_run_directory_in_use_is_refused_naming_its_process(tmp_path, capsys):
    lock = RunLock(tmp_path / "run")  # another run holds it
    try:
        err = _one_line_error(capsys, main(["run", _config(tmp_path), "--out", str(tmp_path / "run")]))
    finally:
        lock.release()
    assert f"{tmp_path / 'run'} is in use by another clpeft run (pid {os.getpid()})" in err
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [".lock"]  # nothing of the refused run written
    assert main(["run", _config(tmp_path), "--out", str(tmp_path / "run")]) == 0  # released: the directory is usable


def test_two_runs_started_together_on_one_directory_never_mix(tmp_path):
    base = _config(tmp_path)
    runs = [
        subprocess.Popen(
            [sys.executable, "-m", "clpeft", "run", base, "--out", "same", *extra],
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for extra in ([], ["--set", "train.lr=0.2", "--seed", "7"])
    ]
    results = [(r.wait(timeout=300), r.stderr.read()) for r in runs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results  # was: both 0, config of one run beside metrics of the other
    refused = next(err for code, err in results if code == 2)
    assert "is in use by another clpeft run" in refused or "already holds a run" in refused
    stored = yaml.safe_load((tmp_path / "same" / "config.yaml").read_text())
    newest = checkpoint.list_checkpoints(tmp_path / "same" / "checkpoints")[-1]
    assert checkpoint.read(newest)[0]["config"] == stored  # one run's files only


def test_empty_out_is_refused_and_the_current_directory_untouched(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "metrics.json").write_text("precious")
    err = _one_line_error(capsys, main(["run", _config(tmp_path), "--out", ""]))
    assert "--out is empty" in err
    assert (tmp_path / "metrics.json").read_text() == "precious"


@pytest.mark.parametrize("present", [["config.yaml", "metrics.json"], ["model.safetensors"], ["events.jsonl"]])
def test_a_directory_holding_run_files_is_never_overwritten(tmp_path, capsys, present):
    out = tmp_path / "mine"
    out.mkdir()
    for name in present:
        (out / name).write_text("precious")
    err = _one_line_error(capsys, main(["run", _config(tmp_path), "--out", str(out)]))
    assert f"{out} already holds a run ({', '.join(present)}); pass --resume" in err
    assert all((out / name).read_text() == "precious" for name in present)


def test_a_finished_run_without_checkpoints_is_not_overwritten(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", _config(tmp_path), "--out", str(out)]) == 0
    metrics = (out / "metrics.json").read_text()
    for path in (out / "checkpoints").iterdir():
        path.unlink()
    capsys.readouterr()
    _one_line_error(capsys, main(["run", _config(tmp_path), "--out", str(out), "--set", "train.lr=0.3"]))
    assert (out / "metrics.json").read_text() == metrics


def test_out_naming_a_file_is_one_line(tmp_path, capsys):
    (tmp_path / "taken").write_text("x")
    err = _one_line_error(capsys, main(["run", _config(tmp_path), "--out", str(tmp_path / "taken")]))
    assert "is a file, not a directory" in err


def _interrupted(tmp_path, capsys):
    """A run whose last experience was lost (its checkpoint and metrics removed)."""
    out = tmp_path / "run"
    assert main(["run", _config(tmp_path), "--out", str(out)]) == 0
    for path in out.glob("checkpoints/exp_002.pt*"):
        path.unlink()
    (out / "metrics.json").unlink()
    capsys.readouterr()
    return out


def test_force_cannot_resume_checkpoints_of_another_stream(tmp_path, capsys, reference):
    out = _interrupted(tmp_path, capsys)
    stored = (out / "config.yaml").read_text()
    err = _one_line_error(
        capsys, main(["run", str(out), "--resume", "--force", "--set", "scenario.n_experiences=2", "--set", "scenario.init_classes=null"])
    )
    assert "the stored checkpoints belong to another stream (scenario.init_classes: 4 -> None; scenario.n_experiences: 3 -> 2)" in err
    assert (out / "config.yaml").read_text() == stored  # was: overwritten before the traceback
    assert main(["run", str(out), "--resume"]) == 0  # and a plain resume still finishes the run
    assert _matrix(out) == reference


def test_force_records_the_changes_and_keeps_the_old_config_in_the_log(tmp_path, capsys):
    out = _interrupted(tmp_path, capsys)
    stored = yaml.safe_load((out / "config.yaml").read_text())
    assert main(["run", str(out), "--resume", "--force", "--set", "train.lr=0.2"]) == 0
    assert "resumed with a changed config (--force): train.lr: 0.01 -> 0.2" in capsys.readouterr().out
    assert yaml.safe_load((out / "config.yaml").read_text())["train"]["lr"] == 0.2
    events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    forced = [e for e in events if e["event"] == "config_forced"]
    assert len(forced) == 1 and forced[0]["changes"] == [{"key": "train.lr", "stored": 0.01, "now": 0.2}]
    assert forced[0]["previous"] == stored


def test_a_checkpoint_that_does_not_fit_the_strategy_is_one_line(tmp_path, capsys):
    out = _interrupted(tmp_path, capsys)
    err = _one_line_error(capsys, main(["run", str(out), "--resume", "--force", "--set", "backbone.hidden=[8]"]))
    assert "exp_001.pt does not fit the configured strategy (" in err
    assert "resume with the config the run was started with" in err
    assert yaml.safe_load((out / "config.yaml").read_text())["backbone"]["hidden"] == [16]


def test_a_full_disk_stops_in_one_line_and_the_run_resumes_to_the_same_matrix(tmp_path, capsys, monkeypatch, reference):
    real = checkpoint._atomic_write

    def full(path, data):
        if path.name == "exp_001.pt":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        real(path, data)

    monkeypatch.setattr(checkpoint, "_atomic_write", full)
    out = tmp_path / "run"
    err = _one_line_error(capsys, main(["run", _config(tmp_path), "--out", str(out)]))
    assert f"{out / 'checkpoints' / 'exp_001.pt'}: No space left on device; free some space" in err
    assert [p.name for p in checkpoint.list_checkpoints(out / "checkpoints")] == ["exp_000.pt"]
    monkeypatch.setattr(checkpoint, "_atomic_write", real)
    assert main(["run", str(out), "--resume"]) == 0
    assert _matrix(out) == reference


def test_a_file_where_checkpoints_belong_is_one_line(tmp_path, capsys, monkeypatch):
    from clpeft.run import Run

    real = Run.train_experience
    out = tmp_path / "run"

    def train_then_block(self, exp, log):  # something puts a file where checkpoints/ goes
        result = real(self, exp, log)
        (out / "checkpoints").write_text("not a directory")
        return result

    monkeypatch.setattr(Run, "train_experience", train_then_block)
    err = _one_line_error(capsys, main(["run", _config(tmp_path), "--out", str(out)]))
    assert f"{out / 'checkpoints'}: File exists; a file stands where a directory is needed" in err


def test_a_multi_seed_directory_is_locked_and_never_written_over(tmp_path, capsys):
    out = tmp_path / "seeds"
    lock = RunLock(out)
    try:
        err = _one_line_error(capsys, main(["run", _config(tmp_path), "--seeds", "0,1", "--out", str(out)]))
    finally:
        lock.release()
    assert f"is in use by another clpeft run (pid {os.getpid()})" in err
    single = tmp_path / "single"
    assert (
        main(["run", _config(tmp_path), "--out", str(single), "--set", "scenario.n_experiences=1", "--set", "scenario.init_classes=null"])
        == 0
    )
    stored = (single / "config.yaml").read_text()
    capsys.readouterr()
    err = _one_line_error(capsys, main(["run", _config(tmp_path), "--seeds", "0,1", "--out", str(single)]))
    assert "already holds seed runs or a run" in err and (single / "config.yaml").read_text() == stored
