"""Hostile checkpoints: no code runs from a file, a tampered or incomplete one is never used.

The ``.sha256`` beside a checkpoint detects damage, not tampering: whoever can replace
``exp_*.pt`` can replace its digest. These tests plant such files (a pickle that would run a
command, a payload without the keys a resume needs) with matching digests and check that
``--resume`` and ``scenario.source_checkpoint`` never execute them. Before the fix (``torch.load``
with ``weights_only=False``) the marker file of the planted payload was created on resume;
mutation check (done once): with ``weights_only=False`` restored in ``checkpoint.read``, the three
planted-pickle tests here fail.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections import OrderedDict

import numpy as np
import pytest
import torch
import yaml

from clpeft import checkpoint, config
from clpeft.cli import main
from clpeft.engine import Engine


class _RunsCode:
    """Pickles as a call of ``os.system``: what an attacker plants in a checkpoint."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _plant(path, payload) -> None:
    """Replace ``path`` by ``payload`` with a digest that matches, as an attacker can."""
    buf = io.BytesIO()
    torch.save(payload, buf)
    data = buf.getvalue()
    path.write_bytes(data)
    path.with_name(path.name + ".sha256").write_text(hashlib.sha256(data).hexdigest())


def _finished_run(tmp_path, digits_run):
    digits_run["scenario"].update(n_experiences=3, init_classes=4)
    digits_run["train"]["epochs"] = 1
    digits_run["logging"]["keep_checkpoints"] = 3
    out = tmp_path / "run"
    reference = Engine(config.resolve(digits_run), out, device="cpu").run()["acc_matrix"]
    (out / "metrics.json").unlink()
    return out, reference


def test_a_planted_pickle_never_runs_on_resume_and_is_skipped_by_name(tmp_path, digits_run, capsys):
    out, reference = _finished_run(tmp_path, digits_run)
    marker = tmp_path / "PWNED"
    newest = out / "checkpoints" / "exp_002.pt"
    _plant(newest, {"format": 1, "experience": 2, "strategy": {}, "x": _RunsCode(marker)})
    assert checkpoint.verify(newest) is None  # the digest does not protect against this

    capsys.readouterr()
    with pytest.warns(UserWarning, match=r"skipping exp_002.pt: unreadable: it asks to load 'posix.system'"):
        code = main(["run", str(out), "--resume", "--device", "cpu"])
    assert code == 0
    assert not marker.exists()
    # the run went on from the previous checkpoint and re-did experience 2 exactly
    assert json.loads((out / "metrics.json").read_text())["acc_matrix"] == reference


def test_checkpoint_read_refuses_any_global_not_only_os_system(tmp_path):
    path = tmp_path / "exp_000.pt"
    _plant(path, {"format": 1, "experience": 0, "strategy": {"w": np.zeros(2)}})  # numpy needs its globals
    payload, problem = checkpoint.read(path)
    assert payload is None and problem.startswith("unreadable: it asks to load 'numpy.")


def test_a_planted_source_checkpoint_never_runs_and_stops_in_one_line(tmp_path, digits_run, capsys):
    marker = tmp_path / "PWNED"
    evil = tmp_path / "exp_000.pt"
    _plant(evil, {"format": 1, "experience": 0, "strategy": {"x": _RunsCode(marker)}})
    run = {
        "seed": 0,
        "scenario": {
            "name": "test_time_adaptation",
            "dataset": "sklearn_digits",
            "corruptions": ["gaussian_noise"],
            "source_checkpoint": str(evil),
        },
        "backbone": {"name": "mlp", "hidden": [16]},
        "strategy": {"name": "source"},
        "logging": {"tensorboard": False, "progress": "never"},
    }
    (tmp_path / "tta.yaml").write_text(yaml.safe_dump(run))
    capsys.readouterr()
    code = main(["run", str(tmp_path / "tta.yaml"), "--out", str(tmp_path / "out"), "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert "it asks to load 'posix.system'" in err and str(evil) in err
    assert not marker.exists()


@pytest.mark.parametrize("drop", ["strategy", "rows", "experience", "timing"])
def test_a_checkpoint_missing_what_resume_needs_is_skipped(tmp_path, digits_run, drop):
    out, reference = _finished_run(tmp_path, digits_run)
    newest = out / "checkpoints" / "exp_002.pt"
    payload = torch.load(newest, weights_only=True)
    del payload[drop]
    _plant(newest, payload)
    with pytest.warns(UserWarning, match=rf"skipping exp_002.pt: incomplete checkpoint \(no '{drop}'\)"):
        resumed = Engine(config.load(out / "config.yaml"), out, device="cpu", resume=True).run()
    assert resumed["acc_matrix"] == reference


@pytest.mark.parametrize("bad", [{"experience": "2"}, {"experience": -1}, {"strategy": [1, 2]}])
def test_a_checkpoint_with_keys_of_the_wrong_kind_is_skipped(tmp_path, bad):
    path = tmp_path / "exp_002.pt"
    _plant(path, {"format": 1, "experience": 2, "strategy": {}, **bad})
    payload, problem = checkpoint.read(path)
    assert payload is None and problem.startswith("incomplete checkpoint"), problem


@pytest.mark.parametrize(
    ("state", "where"),
    [
        ({"buffer._extra_state": {"items": np.arange(3)}}, "['buffer._extra_state']['items'] is a numpy.ndarray"),
        ({"stats._extra_state": {"mean": np.float64(0.5)}}, "['stats._extra_state']['mean'] is a numpy.float64"),
        ({"pool._extra_state": [slice(0, 2)]}, "['pool._extra_state'][0] is a builtins.slice"),
        ({"x": {(1, 2): torch.zeros(1)}}, "['x'] has a key of type tuple"),
    ],
)
def test_save_refuses_state_that_would_not_read_back_and_names_where(tmp_path, state, where):
    with pytest.raises(TypeError, match="plain data only") as caught:
        checkpoint.save(tmp_path, 0, {"experience": 0, "strategy": state})
    assert f"payload['strategy']{where}" in str(caught.value)
    assert list(tmp_path.iterdir()) == []  # nothing half-written


def test_every_plain_type_save_accepts_reads_back_equal(tmp_path):
    state = OrderedDict(
        w=torch.randn(2, 3),
        p=torch.nn.Parameter(torch.ones(2)),
        n=3,
        f=0.25,
        b=True,
        c=1 + 2j,
        s="x",
        raw=b"\x00",
        none=None,
        size=torch.Size([2, 3]),
        dtype=torch.bfloat16,
        dev=torch.device("cpu"),
        nested={"t": (1, [2.0, {3}]), 4: "int key"},
    )
    checkpoint.save(tmp_path, 0, {"experience": 0, "strategy": state})
    payload, problem = checkpoint.read(tmp_path / "exp_000.pt")
    assert problem is None
    got = payload["strategy"]
    assert torch.equal(got["w"], state["w"]) and torch.equal(got["p"], state["p"])
    assert {k: v for k, v in got.items() if k not in ("w", "p")} == {k: v for k, v in state.items() if k not in ("w", "p")}


def test_the_skip_warning_is_one_line_on_the_command_line(tmp_path, digits_run):
    import subprocess
    import sys

    out, _ = _finished_run(tmp_path, digits_run)
    _plant(out / "checkpoints" / "exp_002.pt", {"format": 1, "experience": 2, "strategy": {}, "x": _RunsCode(tmp_path / "P")})
    done = subprocess.run(
        [sys.executable, "-m", "clpeft", "run", str(out), "--resume", "--device", "cpu"], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    warned = [line for line in done.stderr.splitlines() if "exp_002.pt" in line]
    assert warned == [
        f"clpeft: warning: skipping exp_002.pt: unreadable: it asks to load 'posix.system', and clpeft "
        f"never runs code from a checkpoint; falling back to an earlier checkpoint ({out / 'checkpoints' / 'exp_002.pt'})"
    ]
    assert "warnings.warn" not in done.stderr and not (tmp_path / "P").exists()


def test_a_source_checkpoint_with_backbone_tensors_this_backbone_lacks_is_refused(tmp_path, capsys):
    """A LoRA source's adapters (here: one extra backbone tensor) were dropped silently before."""
    run = {
        "seed": 0,
        "scenario": {"name": "test_time_adaptation", "dataset": "sklearn_digits", "corruptions": ["gaussian_noise"], "test_per_class": 10},
        "backbone": {"name": "mlp", "hidden": [16]},
        "strategy": {"name": "source"},
        "train": {"epochs": 1},
        "logging": {"tensorboard": False, "progress": "never"},
    }
    (tmp_path / "a.yaml").write_text(yaml.safe_dump(run))
    assert main(["run", str(tmp_path / "a.yaml"), "--out", str(tmp_path / "a"), "--device", "cpu"]) == 0
    payload, _ = checkpoint.read(checkpoint.list_checkpoints(tmp_path / "a" / "source")[-1])
    payload["strategy"]["backbone.net.0.lora_A"] = torch.zeros(2, 64)
    checkpoint.save(tmp_path / "planted", 0, payload)
    run["scenario"]["source_checkpoint"] = str(tmp_path / "planted" / "exp_000.pt")
    (tmp_path / "b.yaml").write_text(yaml.safe_dump(run))
    capsys.readouterr()
    code = main(["run", str(tmp_path / "b.yaml"), "--out", str(tmp_path / "b"), "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert "its backbone holds ['backbone.net.0.lora_A'], which this backbone has no place for" in err
