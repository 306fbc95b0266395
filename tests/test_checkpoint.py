"""Tests for ``clpeft.checkpoint``: atomic, verified, pruned checkpoints."""

from __future__ import annotations

import hashlib
import os
import warnings

import pytest
import torch

from clpeft import checkpoint
from clpeft.errors import UserError


def _payload(k: int) -> dict:
    g = torch.Generator().manual_seed(k)
    return {
        "experience": k,
        "strategy": {"head.weight": torch.randn(3, 4, generator=g), "buffer._extra_state": {"n_seen": 10 * k}},
        "rows": [[0.5] * (k + 1)],
        "baseline": None,
    }


def _assert_payload_equal(got: dict, k: int) -> None:
    want = _payload(k)
    assert got["format"] == checkpoint.FORMAT_VERSION
    assert got["experience"] == k and got["rows"] == want["rows"] and got["baseline"] is None
    assert torch.equal(got["strategy"]["head.weight"], want["strategy"]["head.weight"])
    assert got["strategy"]["buffer._extra_state"] == want["strategy"]["buffer._extra_state"]


def test_save_load_round_trip(tmp_path):
    d = tmp_path / "ckpt"
    path = checkpoint.save(d, 0, _payload(0))
    assert path == d / "exp_000.pt"
    digest = (d / "exp_000.pt.sha256").read_text().strip()
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest()
    assert checkpoint.verify(path) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        found = checkpoint.load_latest(d)
    assert found is not None
    got_path, got = found
    assert got_path == path
    _assert_payload_equal(got, 0)
    # nothing but the checkpoint and its digest is left behind (no temporary files)
    assert sorted(p.name for p in d.iterdir()) == ["exp_000.pt", "exp_000.pt.sha256"]


def test_latest_is_by_experience_number_not_name_order(tmp_path):
    for k in (9, 10, 2):
        checkpoint.save(tmp_path, k, _payload(k), keep=10)
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["exp_002.pt", "exp_009.pt", "exp_010.pt"]
    path, got = checkpoint.load_latest(tmp_path)
    assert path.name == "exp_010.pt"
    _assert_payload_equal(got, 10)


@pytest.mark.parametrize("keep", [1, 2, 3])
def test_keep_prunes_older_checkpoints_and_their_digests(tmp_path, keep):
    for k in range(5):
        checkpoint.save(tmp_path, k, _payload(k), keep=keep)
        kept = list(range(max(0, k + 1 - keep), k + 1))
        expected = sorted([f"exp_{j:03d}.pt" for j in kept] + [f"exp_{j:03d}.pt.sha256" for j in kept])
        assert sorted(p.name for p in tmp_path.iterdir()) == expected


def test_missing_or_empty_directory_gives_none(tmp_path):
    assert checkpoint.load_latest(tmp_path / "absent") is None
    assert checkpoint.load_latest(tmp_path) is None
    assert checkpoint.list_checkpoints(tmp_path / "absent") == []


def test_truncated_checkpoint_is_skipped_with_a_warning(tmp_path):
    checkpoint.save(tmp_path, 0, _payload(0))
    newest = checkpoint.save(tmp_path, 1, _payload(1))
    data = newest.read_bytes()
    newest.write_bytes(data[: len(data) // 2])
    assert "mismatch" in checkpoint.verify(newest)
    with pytest.warns(UserWarning, match="exp_001.pt"):
        path, got = checkpoint.load_latest(tmp_path)
    assert path.name == "exp_000.pt"
    _assert_payload_equal(got, 0)


def test_one_flipped_byte_is_detected(tmp_path):
    checkpoint.save(tmp_path, 0, _payload(0))
    newest = checkpoint.save(tmp_path, 1, _payload(1))
    data = bytearray(newest.read_bytes())
    data[len(data) // 2] ^= 0x01
    newest.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match="exp_001.pt"):
        path, _ = checkpoint.load_latest(tmp_path)
    assert path.name == "exp_000.pt"


def test_missing_digest_is_skipped_with_a_warning(tmp_path):
    checkpoint.save(tmp_path, 0, _payload(0))
    newest = checkpoint.save(tmp_path, 1, _payload(1))
    (tmp_path / "exp_001.pt.sha256").unlink()
    assert "no checksum" in checkpoint.verify(newest)
    with pytest.warns(UserWarning, match="exp_001.pt"):
        path, got = checkpoint.load_latest(tmp_path)
    assert path.name == "exp_000.pt"
    _assert_payload_equal(got, 0)


def test_all_bad_gives_none_with_a_warning_per_file(tmp_path):
    for k in range(2):
        checkpoint.save(tmp_path, k, _payload(k))
        (tmp_path / f"exp_{k:03d}.pt.sha256").unlink()
    with pytest.warns(UserWarning) as record:
        assert checkpoint.load_latest(tmp_path) is None
    assert sorted(str(w.message).split(":")[0] for w in record) == ["skipping exp_000.pt", "skipping exp_001.pt"]


def test_a_newer_format_version_is_refused_with_a_clear_message(tmp_path, monkeypatch):
    checkpoint.save(tmp_path, 0, _payload(0))
    monkeypatch.setattr(checkpoint, "FORMAT_VERSION", checkpoint.FORMAT_VERSION + 1)
    checkpoint.save(tmp_path, 1, _payload(1))
    monkeypatch.undo()
    # not skipped in favour of exp_000 (that would silently redo an experience): refused
    with pytest.raises(
        UserError,
        match=rf"exp_001.pt has checkpoint format {checkpoint.FORMAT_VERSION + 1}, "
        rf"newer than the format {checkpoint.FORMAT_VERSION} this clpeft reads",
    ):
        checkpoint.load_latest(tmp_path)


@pytest.mark.parametrize("fmt", [None, 0, "1", True])
def test_a_missing_or_invalid_format_version_is_skipped(tmp_path, monkeypatch, fmt):
    checkpoint.save(tmp_path, 0, _payload(0))
    real_save = torch.save
    monkeypatch.setattr(checkpoint.torch, "save", lambda obj, f: real_save({**obj, "format": fmt}, f))
    checkpoint.save(tmp_path, 1, _payload(1))  # digest matches: only the format is wrong
    monkeypatch.undo()
    assert checkpoint.verify(tmp_path / "exp_001.pt") is None
    with pytest.warns(UserWarning, match=r"skipping exp_001.pt: not a clpeft checkpoint"):
        path, got = checkpoint.load_latest(tmp_path)
    assert path.name == "exp_000.pt"
    _assert_payload_equal(got, 0)


def test_a_verified_file_that_does_not_unpickle_is_skipped(tmp_path):
    checkpoint.save(tmp_path, 0, _payload(0))
    bad = tmp_path / "exp_001.pt"
    bad.write_bytes(b"not a pickle at all")
    (tmp_path / "exp_001.pt.sha256").write_text(hashlib.sha256(bad.read_bytes()).hexdigest())
    with pytest.warns(UserWarning, match=r"skipping exp_001.pt: unreadable"):
        path, got = checkpoint.load_latest(tmp_path)
    assert path.name == "exp_000.pt"
    _assert_payload_equal(got, 0)


def test_skips_are_reported_to_the_caller_with_the_file(tmp_path):
    for k in range(3):
        checkpoint.save(tmp_path, k, _payload(k), keep=3)
    (tmp_path / "exp_002.pt.sha256").unlink()
    data = (tmp_path / "exp_001.pt").read_bytes()
    (tmp_path / "exp_001.pt").write_bytes(data[:-10])
    skipped = []
    with pytest.warns(UserWarning) as record:
        path, got = checkpoint.load_latest(tmp_path, on_skip=lambda p, why: skipped.append((p.name, why)))
    assert path.name == "exp_000.pt"
    _assert_payload_equal(got, 0)
    assert skipped == [
        ("exp_002.pt", "no checksum file (the write was interrupted)"),
        ("exp_001.pt", "checksum mismatch (truncated or corrupted)"),
    ]
    # each warning names the full path of its file, so the user can find it
    assert [str(w.message).endswith(f"({tmp_path / name})") for w, name in zip(record, ("exp_002.pt", "exp_001.pt"))] == [True, True]


def test_a_crash_before_the_rename_leaves_the_previous_checkpoint_intact(tmp_path, monkeypatch):
    checkpoint.save(tmp_path, 0, _payload(0))
    before = (tmp_path / "exp_000.pt").read_bytes()

    def crash(src, dst):
        raise OSError("simulated crash")

    monkeypatch.setattr(checkpoint.os, "replace", crash)
    with pytest.raises(OSError, match="simulated crash"):
        checkpoint.save(tmp_path, 1, _payload(1))
    monkeypatch.undo()
    assert not (tmp_path / "exp_001.pt").exists()
    assert (tmp_path / "exp_000.pt").read_bytes() == before
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        path, got = checkpoint.load_latest(tmp_path)
    assert path.name == "exp_000.pt"
    _assert_payload_equal(got, 0)


def test_overwriting_the_same_experience_replaces_it(tmp_path):
    checkpoint.save(tmp_path, 3, _payload(3))
    checkpoint.save(tmp_path, 3, _payload(4))
    path, got = checkpoint.load_latest(tmp_path)
    assert path.name == "exp_003.pt"
    assert got["experience"] == 4
    assert checkpoint.verify(path) is None
    assert os.path.getsize(path) > 0
