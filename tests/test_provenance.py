"""What produced a run: versions, commits, device and threads in metrics.json; the real out; the directory name."""

from __future__ import annotations

import importlib.metadata
import json
import subprocess

import torch
import yaml

from clpeft.cli import main

RUN = {
    "scenario": {"name": "class_incremental", "dataset": "sklearn_digits", "n_experiences": 2},
    "backbone": {"name": "mlp", "hidden": [16]},
    "strategy": {"name": "finetune"},
    "logging": {"tensorboard": False, "progress": "never"},
}


def _git(cwd, *args) -> str:
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True).stdout.strip()


def test_metrics_record_versions_commit_device_and_threads(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(RUN))
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "-c", "user.name=t", "-c", "user.email=t@t", "add", "c.yaml")
    _git(tmp_path, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "experiment")
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({**RUN, "seed": 1}))  # an uncommitted change
    assert main(["run", "c.yaml", "--out", "run"]) == 0
    record = json.loads((tmp_path / "run" / "metrics.json").read_text())["provenance"]
    assert record["versions"]["clpeft"] == importlib.metadata.version("clpeft")
    assert record["versions"]["torch"] == importlib.metadata.version("torch") and torch.__version__.startswith(
        record["versions"]["torch"].split("+")[0]
    )
    assert record["git"]["working_directory"] == {
        "commit": _git(tmp_path, "rev-parse", "HEAD"),
        "dirty": True,
        "root": str(tmp_path.resolve()),
    }
    assert record["device"] == "cpu" and record["torch_threads"] == torch.get_num_threads()


def test_config_yaml_records_the_directory_written_and_the_default_name_has_the_strategy(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "exp.yaml").write_text(yaml.safe_dump(RUN))
    assert main(["run", "exp.yaml", "--set", "strategy={name: replay, mem_size: 20}"]) == 0
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert run_dir.name.startswith("exp-replay-")
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["out"] == str(run_dir.relative_to(tmp_path))
