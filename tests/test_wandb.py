"""``logging.wandb``: every event and the final metrics reach Weights & Biases, and a resume continues one W&B run."""

from __future__ import annotations

import json
import sys
import time
import types

import pytest
import yaml

from clpeft.cli import main

RUN = {
    "seed": 0,
    "scenario": {"name": "class_incremental", "dataset": "sklearn_digits", "n_experiences": 2},
    "backbone": {"name": "mlp", "hidden": [16]},
    "strategy": {"name": "finetune"},
    "logging": {"tensorboard": False, "progress": "never", "wandb": {"project": "clpeft-test", "mode": "offline", "tags": ["ci"]}},
}


class _FakeRun:
    def __init__(self, calls, **kwargs):
        self.calls, self.summary = calls, {}
        calls.append(("init", kwargs))

    def log(self, values):
        self.calls.append(("log", values))

    def finish(self):
        self.calls.append(("finish", dict(self.summary)))


def test_events_config_and_metrics_reach_wandb_and_a_resume_continues_the_same_run(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=lambda **kw: _FakeRun(calls, **kw)))
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(RUN))
    assert main(["run", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "run")]) == 0
    (init, kwargs), *logged, (finish, summary) = calls
    assert kwargs["project"] == "clpeft-test" and kwargs["mode"] == "offline" and kwargs["tags"] == ["ci"]
    assert kwargs["name"] == "run" and kwargs["dir"] == str(tmp_path / "run") and kwargs["resume"] == "allow"
    assert kwargs["config"]["strategy"]["name"] == "finetune" and kwargs["config"]["out"] == str(tmp_path / "run")
    events = [json.loads(line) for line in (tmp_path / "run" / "events.jsonl").read_text().splitlines()]
    ends = [e for e in events if e["event"] == "experience_end"]
    sent = [values for kind, values in logged if "experience_end/acc_seen" in values]
    assert [v["experience_end/acc_seen"] for v in sent] == [e["acc_seen"] for e in ends]  # every event, same numbers
    assert [v["experience_end/step"] for v in sent] == [0, 1]
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())["metrics"]
    assert summary == {k: v for k, v in metrics.items() if isinstance(v, float)}  # the final scalars, n/a left out
    first_id = kwargs["id"]
    calls.clear()
    (tmp_path / "run" / "metrics.json").unlink()
    assert main(["run", str(tmp_path / "run"), "--resume"]) == 0
    assert calls[0][1]["id"] == first_id  # the same W&B run continues


def test_offline_mode_runs_the_real_wandb(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(RUN))
    assert main(["run", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "run")]) == 0
    (offline,) = (tmp_path / "run" / "wandb").glob("offline-run-*")
    (records,) = offline.glob("run-*.wandb")
    # the run's history and summary, for `wandb sync`; wandb's service process may still be
    # flushing the file when finish() returns (seen as 7 bytes on a loaded 2-core machine)
    deadline = time.monotonic() + 60
    while records.stat().st_size <= 1000 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert records.stat().st_size > 1000


def test_a_missing_wandb_package_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import fails
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(RUN))
    assert main(["run", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "logging.wandb: needs the wandb package: pip install" in err
