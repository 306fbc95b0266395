"""Crash safety: SIGKILL while a checkpoint is written, damaged checkpoints, newer formats.

tests/test_engine.py kills a run mid-epoch and mid-evaluation; here the process dies inside
:func:`clpeft.checkpoint.save` (a plug-in replaces ``checkpoint._atomic_write`` in the killed
process only): after half of the temporary file, after the whole temporary file but before
the rename, and after the rename but before the ``.sha256`` digest. Each time ``--resume``
must end with the accuracy matrix of an uninterrupted run, bitwise.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import warnings

import pytest
import torch
import yaml

from clpeft import checkpoint, config
from clpeft.cli import main
from clpeft.engine import Engine

KILL_EXPERIENCE = 2

KILLER = textwrap.dedent('''
    import os, signal
    from typing import Literal
    from clpeft import checkpoint
    from clpeft.strategies.replay import Replay


    def _kill():
        os.kill(os.getpid(), signal.SIGKILL)


    class CheckpointKiller(Replay):
        """Replay whose process is SIGKILLed inside the checkpoint write of one experience."""

        def __init__(self, backbone, kill_at: Literal["none", "partial_temp", "before_rename", "before_digest"] = "none",
                     kill_experience: int = 2, mem_size: int = 100):
            super().__init__(backbone, mem_size=mem_size)
            if kill_at == "none":
                return
            target = f"exp_{kill_experience:03d}.pt"
            real_write = checkpoint._atomic_write

            def write(path, data):
                if path.name == target and kill_at in ("partial_temp", "before_rename"):
                    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")  # as the real write names it
                    with open(tmp, "wb") as f:
                        f.write(data[: len(data) // 2] if kill_at == "partial_temp" else data)
                        f.flush()
                        os.fsync(f.fileno())
                    _kill()
                if path.name == target + ".sha256" and kill_at == "before_digest":
                    _kill()
                real_write(path, data)

            checkpoint._atomic_write = write
''')


def _setup(tmp_path, digits_run):
    (tmp_path / "killer.py").write_text(KILLER)
    digits_run["strategy"] = {"name": "killer.py:CheckpointKiller", "kill_experience": KILL_EXPERIENCE}
    digits_run["train"]["epochs"] = 1
    digits_run["logging"]["keep_checkpoints"] = 5  # the reference keeps every checkpoint, to compare sizes
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(digits_run))
    return config.load(tmp_path / "run.yaml")


def _resume(cfg, out):
    return Engine(cfg, out, device="cpu", resume=True, force=True).run()


def _matrix(run_dir):
    return json.loads((run_dir / "metrics.json").read_text())["acc_matrix"]


@pytest.mark.parametrize(
    "kill_at",
    ["before_digest", pytest.param("partial_temp", marks=pytest.mark.slow), pytest.param("before_rename", marks=pytest.mark.slow)],
)
def test_sigkill_inside_a_checkpoint_write_resumes_to_the_same_matrix(tmp_path, digits_run, monkeypatch, kill_at):
    cfg = _setup(tmp_path, digits_run)
    monkeypatch.chdir(tmp_path)
    reference = Engine(cfg, tmp_path / "ref", device="cpu").run()["acc_matrix"]

    killed = subprocess.run(
        [sys.executable, "-m", "clpeft", "run", "run.yaml", "--out", "killed", "--device", "cpu", "--set", f"strategy.kill_at={kill_at}"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert killed.returncode == -9, killed.stderr  # SIGKILL
    ckpt = tmp_path / "killed" / "checkpoints"
    target = ckpt / f"exp_{KILL_EXPERIENCE:03d}.pt"
    temps = list(ckpt.glob(".exp_*.tmp*"))
    if kill_at == "before_digest":  # renamed into place, but its digest never written
        assert target.exists() and temps == []
        assert checkpoint.verify(target) == "no checksum file (the write was interrupted)"
    else:  # the temporary file is there (half or whole), the checkpoint is not
        assert not target.exists() and len(temps) == 1
        full = (tmp_path / "ref" / "checkpoints" / target.name).stat().st_size
        assert temps[0].stat().st_size == (full // 2 if kill_at == "partial_temp" else full)
    assert [checkpoint.verify(p) for p in checkpoint.list_checkpoints(ckpt) if p != target] == [None, None]

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        resumed = _resume(cfg, tmp_path / "killed")
    skipped = [str(w.message) for w in caught if "skipping" in str(w.message)]
    if kill_at == "before_digest":  # the user is told which file was not used
        assert len(skipped) == 1 and skipped[0].startswith(f"skipping {target.name}: no checksum file"), skipped
    else:
        assert skipped == []
    assert resumed["acc_matrix"] == reference  # bitwise (floats compared exactly)
    assert _matrix(tmp_path / "killed") == _matrix(tmp_path / "ref")
    assert list(ckpt.glob(".exp_*.tmp*")) == []  # the killed write's debris is gone
    assert all(checkpoint.verify(p) is None for p in checkpoint.list_checkpoints(ckpt))


def test_a_corrupted_newest_checkpoint_falls_back_to_the_previous_and_says_so(tmp_path, digits_run):
    digits_run["train"]["epochs"] = 1
    digits_run["logging"]["keep_checkpoints"] = 3
    cfg = config.resolve(digits_run)
    reference = Engine(cfg, tmp_path / "run", device="cpu").run()["acc_matrix"]
    newest = tmp_path / "run" / "checkpoints" / "exp_004.pt"
    data = bytearray(newest.read_bytes())
    data[len(data) // 3] ^= 0xFF  # one flipped byte: same size, different content
    newest.write_bytes(bytes(data))
    (tmp_path / "run" / "metrics.json").unlink()

    events = tmp_path / "run" / "events.jsonl"
    before = len(events.read_text().splitlines())
    with pytest.warns(UserWarning, match=r"skipping exp_004.pt: checksum mismatch \(truncated or corrupted\)"):
        resumed = Engine(cfg, tmp_path / "run", device="cpu", resume=True).run()
    assert resumed["acc_matrix"] == reference  # experience 4 was trained again from exp_003
    resumed_events = [json.loads(line) for line in events.read_text().splitlines()[before:]]
    assert [e["checkpoint"] for e in resumed_events if e["event"] == "resumed"] == ["exp_003.pt"]  # the run log says so too
    assert checkpoint.verify(newest) is None


def test_resuming_a_newer_format_is_refused_in_one_line(tmp_path, digits_run, capsys):
    digits_run["scenario"]["n_experiences"] = 2
    digits_run["train"]["epochs"] = 1
    out = tmp_path / "run"
    Engine(config.resolve(digits_run), out, device="cpu").run()
    newest = checkpoint.list_checkpoints(out / "checkpoints")[-1]
    payload = torch.load(newest, weights_only=False)
    del payload["format"]
    with pytest.MonkeyPatch.context() as mp:  # what a future clpeft would write
        mp.setattr(checkpoint, "FORMAT_VERSION", checkpoint.FORMAT_VERSION + 1)
        checkpoint.save(out / "checkpoints", payload["experience"], payload)
    (out / "metrics.json").unlink()
    capsys.readouterr()
    code = main(["run", str(out), "--resume", "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert f"{newest} has checkpoint format {checkpoint.FORMAT_VERSION + 1}, newer than the format" in err
    assert not (out / "metrics.json").exists()
