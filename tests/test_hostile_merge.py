"""Hostile input for ``clpeft merge`` (issues 19 and 20): each case is one line on stderr and exit
status 2, or a correct merge; no input is ever overwritten and no partial output is left behind.

Families: non-finite parameters and outputs, outputs that alias inputs, malformed safetensors
headers and shard indexes, signals during a merge, normalisation statistics, write errors and
unbounded error messages.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import signal
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from clpeft.cli import main
from clpeft.errors import UserError
from clpeft.merging import adamerging, functional_forward, get_method, merge, merge_files
from clpeft.merging.io import open_checkpoint
from clpeft.merging.output import atomic_output, check_outputs

BASE = torch.randn(4, 4, generator=torch.Generator().manual_seed(0))


@pytest.fixture
def pair(tmp_path, monkeypatch):
    """``b.safetensors`` and ``a.safetensors`` (``w`` plus 0.1) in the working directory."""
    save_file({"w": BASE}, tmp_path / "b.safetensors")
    save_file({"w": BASE + 0.1}, tmp_path / "a.safetensors")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def fail(capsys, *argv: str) -> str:
    """Run ``clpeft merge ARGV``; it must exit 2 with exactly one ``clpeft: error:`` line."""
    status = main(["merge", *argv])
    err = capsys.readouterr().err
    assert status == 2, err
    assert err.startswith("clpeft: error: ") and err.count("\n") == 1, err
    return err


def files(directory: Path) -> dict[str, bytes]:
    """Every file under ``directory`` (following no links) with a digest of its bytes."""
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).digest()
        for p in sorted(directory.rglob("*"))
        if p.is_file() and not p.is_symlink()
    }


def leftovers(directory: Path) -> list[str]:
    return [p.name for p in directory.rglob("*.tmp")]


ARGS = ("--base", "b.safetensors", "--models", "a.safetensors", "--method", "task_arithmetic")

# ---------------------------------------------------------------- non-finite parameters and outputs


@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf", "1e400", "[.nan]", "[1.0e+400]"])
def test_non_finite_parameters_are_rejected_before_merging(pair, capsys, value):
    """Guards: scale=.nan (and friends) wrote an all-NaN model with exit 0."""
    key = "weights" if value.startswith("[") else "scale"
    err = fail(capsys, *ARGS, "--set", f"{key}={value}", "--out", "m.safetensors")
    assert f"parameters.{key}" in err and "finite number" in err
    assert not (pair / "m.safetensors").exists() and leftovers(pair) == []


def test_non_finite_parameters_are_rejected_by_the_python_api(pair):
    """Guards: the registry, not only the CLI, refuses NaN/inf for every float parameter and method."""
    nan = float("nan")
    for method, params in [
        ("task_arithmetic", {"scale": nan}),
        ("task_arithmetic", {"weights": [1.0, math.inf]}),
        ("ties", {"scale": -math.inf}),
        ("dare", {"weights": [nan]}),
    ]:
        with pytest.raises(UserError, match="finite number"):
            get_method(method).validate(params)
        with pytest.raises(UserError, match="finite number"):
            merge({"w": BASE}, [{"w": BASE + 1}], method, **params)
        with pytest.raises(UserError, match="finite number"):
            merge_files("b.safetensors", ["a.safetensors"], "m.safetensors", method, **params)
    with pytest.raises(UserError, match="parameters.init: .*finite"):  # model scope: AdaMerging's floats too
        get_method("adamerging").validate({"init": nan, "forward": print, "loaders": []})
    assert not (pair / "m.safetensors").exists()


@pytest.mark.parametrize("setting", ["scale=-1e39", "weights=[1e39]"])
def test_an_overflowing_merge_is_an_error_naming_the_tensor(pair, capsys, setting):
    """Guards: finite parameters that overflow float32 gave a -inf/NaN model with exit 0."""
    before = files(pair)
    err = fail(capsys, *ARGS, "--set", setting, "--out", "m.safetensors")
    assert "'w'" in err and "finite inputs" in err
    assert files(pair) == before and leftovers(pair) == []  # no output, no report, no temp file


def test_float16_output_overflow_is_caught_although_the_task_vector_is_finite(pair):
    """Guards (own case): base + delta fits float32 but not the model's float16 (max 65504)."""
    base = {"h": torch.full((8,), 60000.0, dtype=torch.float16)}
    finetuned = {"h": torch.full((8,), 64000.0, dtype=torch.float16)}
    with pytest.raises(UserError, match="'h'.*float16"):
        merge(base, [finetuned], "task_arithmetic", scale=2.0)
    assert merge(base, [finetuned], "task_arithmetic", scale=1.0)["h"].eq(64000).all()


def test_huge_finite_values_merge_and_are_reported_exactly(tmp_path):
    """Guards: 1e20 entries were called "NaN or infinite" because a float32 norm overflowed."""
    save_file({"w": torch.full((4, 4), 1e20)}, tmp_path / "b.safetensors")
    save_file({"w": torch.full((4, 4), 1.5e20)}, tmp_path / "a.safetensors")
    report = merge_files(tmp_path / "b.safetensors", [tmp_path / "a.safetensors"], tmp_path / "m.safetensors", "mean")
    assert load_file(tmp_path / "m.safetensors")["w"].eq(torch.tensor(1.5e20)).all()
    tensor = report.tensors[0]
    assert tensor.task_vector_norms == pytest.approx([4 * (torch.tensor(1.5e20) - torch.tensor(1e20)).item()])
    assert tensor.merged_norm == pytest.approx(tensor.task_vector_norms[0]) and tensor.density == 1.0
    json.loads((tmp_path / "m.report.json").read_text(), parse_constant=pytest.fail)  # strict JSON


def test_a_nan_input_is_still_named(pair, capsys):
    """Guards: the finiteness diagnosis still blames the input that holds the NaN."""
    bad = BASE.clone()
    bad[1, 2] = float("nan")
    save_file({"w": bad}, pair / "a.safetensors")
    err = fail(capsys, *ARGS, "--out", "m.safetensors")
    assert "tensor 'w' of a.safetensors holds NaN or infinite values" in err


# ---------------------------------------------------------------- outputs that alias inputs


def alias(pair: Path, spelling: str) -> str:
    """Another name of ``b.safetensors``."""
    if spelling == "symlink":
        (pair / "link.safetensors").symlink_to(pair / "b.safetensors")
        return "link.safetensors"
    if spelling == "hardlink":
        os.link(pair / "b.safetensors", pair / "hard.safetensors")
        return "hard.safetensors"
    if spelling == "absolute":
        return str(pair / "sub" / ".." / "b.safetensors")
    return spelling


@pytest.mark.parametrize(
    ("flag", "spelling"),
    [
        ("--out", "b.safetensors"),
        ("--out", "./b.safetensors"),
        ("--out", "absolute"),
        ("--out", "symlink"),
        ("--out", "hardlink"),
        ("--out", "a.safetensors"),
        ("report", "b.safetensors"),
        ("report", "./a.safetensors"),
        ("report", "hardlink"),
    ],
)
def test_an_output_never_replaces_an_input(pair, capsys, flag, spelling):
    """Guards: --out or --set report= naming an input (in any spelling) destroyed that input."""
    (pair / "sub").mkdir()
    target = alias(pair, spelling)
    before = files(pair)
    out = ("--out", target) if flag == "--out" else ("--out", "m.safetensors", "--set", f"report={target}")
    err = fail(capsys, *ARGS, *out)
    assert "same file as the input" in err
    assert files(pair) == before and leftovers(pair) == []


def test_out_equal_to_the_report_is_refused(pair, capsys):
    """Guards: --out equal to the report path lost the report (or the model)."""
    err = fail(capsys, *ARGS, "--out", "m.safetensors", "--set", "report=./m.safetensors")
    assert "report" in err and "output" in err
    assert not (pair / "m.safetensors").exists()


def test_an_existing_directory_as_report_is_refused(pair, capsys):
    """Guards: a directory named as an output file gave an IsADirectoryError traceback after the whole merge."""
    (pair / "d").mkdir()
    err = fail(capsys, *ARGS, "--out", "m.safetensors", "--set", "report=d")
    assert "is a directory" in err
    assert list((pair / "d").iterdir()) == [] and not (pair / "m.safetensors").exists()


def test_an_existing_directory_as_out_gets_a_sharded_checkpoint(pair, capsys):
    """Was the same traceback for --out; a directory --out now means a sharded checkpoint written into it
    (docs/merging_llm.md), so it must hold one, with its index, and no stray merged file beside it."""
    (pair / "d").mkdir()
    assert main(["merge", *ARGS, "--out", "d"]) == 0
    index = json.loads((pair / "d" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) and all((pair / "d" / shard).is_file() for shard in index["weight_map"].values())
    assert not (pair / "m.safetensors").exists()


def test_an_output_that_is_a_device_or_pipe_is_refused(pair, capsys):
    """Guards (own case): renaming the merged file onto --out /dev/null (as root) replaced the device
    node itself; a named pipe stands in for it here, so a regression cannot damage the machine."""
    os.mkfifo(pair / "pipe")
    err = fail(capsys, *ARGS, "--out", "pipe")
    assert "not a regular file" in err and (pair / "pipe").is_fifo()
    with pytest.raises(UserError, match="not a regular file"):
        check_outputs({"out": Path("/dev/null")}, [])


def test_an_output_inside_an_input_directory_is_refused(pair, capsys):
    """Guards: a merged file written into a run or shard directory given as input becomes part of
    that checkpoint (the run directory then resolves to the merged file, shards get duplicates)."""
    run = pair / "run"
    (run / "checkpoints").mkdir(parents=True)
    save_file({"w": BASE + 0.2}, run / "checkpoints" / "exp_000.safetensors")
    shards = pair / "shards"
    shards.mkdir()
    save_file({"w": BASE}, shards / "model.safetensors")
    before = files(pair)
    for base, out in [
        ("b.safetensors", "run/merged.safetensors"),
        ("b.safetensors", "run/checkpoints/exp_999.safetensors"),
        ("shards", "shards/merged.safetensors"),
    ]:
        models = "run" if base == "b.safetensors" else "a.safetensors"
        err = fail(capsys, "--base", base, "--models", models, "--method", "mean", "--out", out)
        assert "inside the input directory" in err
    assert files(pair) == before


def test_out_beneath_a_file_is_one_line(pair, capsys):
    """Guards (own case): --out b.safetensors/m.safetensors (a file as parent directory)."""
    before = files(pair)
    err = fail(capsys, *ARGS, "--out", "b.safetensors/m.safetensors")
    assert "b.safetensors" in err
    assert files(pair) == before


# ---------------------------------------------------------------- malformed headers


def raw_file(path: Path, header, data: bytes = b"") -> None:
    """A safetensors-shaped file with any header (a JSON value or raw bytes) and data section."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def entry(begin: int, end: int, shape=(2,), dtype="F32") -> dict:
    return {"dtype": dtype, "shape": list(shape), "data_offsets": [begin, end]}


HEADERS = {
    "negative offsets": ({"w": entry(-8, 0)}, 8, "data_offsets"),
    "begin after end": ({"w": entry(8, 0, shape=(0,))}, 8, "data_offsets"),
    "overlap": ({"w": entry(0, 8), "v": entry(4, 12)}, 12, "overlap"),
    "gap": ({"w": entry(8, 16)}, 16, "bytes 0-8"),
    "trailing bytes": ({"w": entry(0, 8)}, 16, "bytes 8-16"),
    "duplicate name": (
        b'{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"w":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}}',
        16,
        "bytes 0-8",
    ),
    "string metadata": ({"__metadata__": "x", "w": entry(0, 8)}, 8, "__metadata__"),
    "non-string metadata": ({"__metadata__": {"k": 1}, "w": entry(0, 8)}, 8, "__metadata__"),
    "deep nesting": (b"[" * 100_000 + b"]" * 100_000, 0, "nested"),
    "digit bomb": (b'{"w":{"dtype":"F32","shape":[' + b"9" * 5000 + b'],"data_offsets":[0,8]}}', 8, "header"),
    "negative dimensions": ({"w": entry(0, 8, shape=(-1, -2))}, 8, "non-negative integers"),
    "fractional dimension": ({"w": entry(0, 8, shape=(2.5,))}, 8, "non-negative integers"),
    "boolean offsets": ({"w": entry(False, True, shape=(1,), dtype="U8")}, 1, "data_offsets"),
    "three offsets": ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4, 8]}}, 8, "data_offsets"),
    "UTF-16 header": ('{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}'.encode("utf-16"), 8, "UTF-8"),
    "unknown dtype": ({"w": entry(0, 8, dtype="F128")}, 8, "dtype"),
    "entry not an object": ({"w": [1, 2]}, 8, "w"),
}


@pytest.mark.parametrize("case", HEADERS)
def test_malformed_headers_are_one_line_naming_the_file(pair, capsys, case):
    """Guards: malformed headers were read as weights, silently accepted or raised tracebacks."""
    header, size, problem = HEADERS[case]
    raw_file(pair / "bad.safetensors", header, b"\0" * size)
    err = fail(capsys, "--base", "bad.safetensors", "--models", "a.safetensors", "--method", "mean", "--out", "m.safetensors")
    assert "bad.safetensors" in err and problem in err, err
    assert len(err) < 400  # the entry is quoted briefly, never whole


def test_the_safetensors_library_agrees_on_what_is_malformed(pair):
    """Guards: every header refused here is refused by safetensors itself (no false alarms)."""
    for case, (header, size, _) in HEADERS.items():
        raw_file(pair / "bad.safetensors", header, b"\0" * size)
        try:
            with safe_open(pair / "bad.safetensors", "pt") as f:
                [f.get_tensor(k) for k in f.keys()]
        except Exception:  # noqa: BLE001 (its own error types)
            continue
        pytest.fail(f"safetensors accepts {case}")
    save_file({"w": torch.zeros(2), "e": torch.zeros(0), "v": torch.ones(3)}, pair / "ok.safetensors")
    with open_checkpoint(pair / "ok.safetensors") as source:  # zero-size tensors share an offset
        assert source.read("v").tolist() == [1.0, 1.0, 1.0]


@pytest.mark.parametrize(
    "index",
    [{"weight_map": ["a.safetensors"]}, {"weight_map": {"w": 5}}, "[" * 100_000, {"weight_map": None}],
    ids=["list", "number", "deep", "null"],
)
def test_malformed_shard_indexes_are_one_line(pair, capsys, index):
    """Guards (own case): a shard index whose weight_map is not name -> file gave tracebacks."""
    text = index if isinstance(index, str) else json.dumps(index)
    (pair / "model.safetensors.index.json").write_text(text)
    err = fail(capsys, "--base", "model.safetensors.index.json", "--models", "a.safetensors", "--method", "mean", "--out", "m.safetensors")
    assert "model.safetensors.index.json" in err


@pytest.mark.parametrize(
    "config",
    [
        "[1, 2]",
        "[" * 100_000,
        '{"r": "x", "lora_alpha": 8}',
        '{"r": 1, "lora_alpha": "x"}',
        '{"r": 1, "lora_alpha": 8, "rank_pattern": [1]}',
        '{"r": 1, "lora_alpha": 8, "alpha_pattern": {"(": 2}}',
    ],
    ids=["list", "deep", "string rank", "string alpha", "pattern list", "bad regex"],
)
def test_malformed_adapter_configs_are_one_line(pair, capsys, config):
    """Guards (own case): adapter_config.json that is not an object, nested too deep, or ill-typed."""
    adapter = pair / "adapter"
    adapter.mkdir()
    prefix = "base_model.model.x"
    factors = {f"{prefix}.lora_A.weight": torch.ones(1, 4), f"{prefix}.lora_B.weight": torch.ones(4, 1)}
    save_file(factors, adapter / "adapter_model.safetensors")
    (adapter / "adapter_config.json").write_text(config)
    save_file({"x.weight": BASE}, pair / "b.safetensors")
    err = fail(capsys, "--base", "b.safetensors", "--models", "adapter", "--method", "mean", "--out", "m.safetensors")
    assert "adapter_config.json" in err


def test_a_rank_zero_adapter_is_one_line(pair, capsys):
    """Guards (own case): LoRA factors of rank 0 divided alpha by zero (a traceback)."""
    save_file({"x.weight": BASE}, pair / "b.safetensors")
    save_file({"x.lora_A": torch.ones(0, 4), "x.lora_B": torch.ones(4, 0), "x.lora_alpha": torch.tensor(8.0)}, pair / "zero.safetensors")
    err = fail(capsys, "--base", "b.safetensors", "--models", "zero.safetensors", "--method", "mean", "--out", "m.safetensors")
    assert "zero.safetensors" in err and "'x'" in err


# ---------------------------------------------------------------- signals


CHILD = """
import sys, time
from clpeft.merging import io
from clpeft.cli import main
write = io.SafetensorsWriter.write
def slow(self, name, tensor):
    write(self, name, tensor)
    print("writing", flush=True)
    time.sleep(60)
io.SafetensorsWriter.write = slow
sys.exit(main(["merge", "--base", "b.safetensors", "--models", "a.safetensors", "--method", "mean",
               "--out", "m.safetensors"]))
"""


def interrupted(directory: Path, signum: int) -> subprocess.CompletedProcess:
    """Run a merge in a child process and send it ``signum`` while it writes the output."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD],
        cwd=directory,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        # as from a shell: a suite started in the background (`nohup pytest &`) ignores SIGINT, and a child inherits that
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    assert child.stdout.readline() == "writing\n"
    assert [p.name for p in directory.glob(".m.safetensors.*")]  # a temp output exists now
    child.send_signal(signum)
    out, err = child.communicate(timeout=30)
    return subprocess.CompletedProcess(child.args, child.returncode, out, err)


@pytest.mark.parametrize(("signum", "status"), [(signal.SIGTERM, 128 + signal.SIGTERM), (signal.SIGINT, 130)])
def test_a_signal_during_a_merge_removes_the_temp_output(pair, signum, status):
    """Guards: SIGTERM (Slurm preemption) left the hidden temp output behind; SIGINT's message
    spoke of checkpointed experiences, which a merge does not have."""
    before = files(pair)
    result = interrupted(pair, signum)
    assert result.returncode == status, result.stderr
    assert files(pair) == before and leftovers(pair) == [] and not list(pair.glob(".m.*"))
    if signum == signal.SIGINT:
        assert result.stderr == "clpeft: interrupted; no output written\n"


def test_the_next_merge_removes_a_killed_merges_temp_output(pair, capsys):
    """Guards: a SIGKILLed merge's temp file stayed forever; the next merge of that output removes it."""
    assert interrupted(pair, signal.SIGKILL).returncode == -signal.SIGKILL
    assert leftovers(pair)
    assert main(["merge", *ARGS, "--out", "m.safetensors"]) == 0
    assert leftovers(pair) == [] and load_file(pair / "m.safetensors")["w"].shape == (4, 4)


def test_a_live_merges_temp_output_is_never_removed(pair):
    """Guards: removing stale temp files must spare those that a running merge is writing."""
    with pytest.raises(RuntimeError), atomic_output(pair / "m.safetensors") as live:  # a merge in progress
        live.write(b"x")
        (temp,) = leftovers(pair)
        assert main(["merge", *ARGS, "--out", "m.safetensors"]) == 0
        assert leftovers(pair) == [temp]
        raise RuntimeError("end the live writer")
    assert leftovers(pair) == []


# ---------------------------------------------------------------- normalisation statistics


def batchnorm_models(var_a: float = 1.0, var_b: float = 2.0):
    """A conv + BatchNorm state dict (float num_batches_tracked, as some exports store it) and two fine-tunes."""
    base = {
        "conv.weight": BASE.clone(),
        "bn.weight": torch.ones(4),
        "bn.running_mean": torch.zeros(4),
        "bn.running_var": torch.full((4,), 100.0),
        "bn.num_batches_tracked": torch.tensor(7.0),
    }
    fine = [
        {
            **base,
            "conv.weight": BASE + 0.1,
            "bn.running_mean": torch.full((4,), 1.0),
            "bn.running_var": torch.full((4,), var_a),
            "bn.num_batches_tracked": torch.tensor(107.0),
        },
        {
            **base,
            "conv.weight": BASE - 0.3,
            "bn.running_mean": torch.full((4,), 3.0),
            "bn.running_var": torch.full((4,), var_b),
            "bn.num_batches_tracked": torch.tensor(207.0),
        },
    ]
    return base, fine


@pytest.mark.parametrize(
    ("method", "params"), [("task_arithmetic", {"scale": 1.0}), ("ties", {"density": 1.0}), ("dare", {"drop_rate": 0.5})]
)
def test_batchnorm_statistics_are_averaged_never_task_arithmetic(method, params):
    """Guards (issue 20): running_var merged as a task vector came out as -97 (a variance)."""
    base, fine = batchnorm_models()
    merged = merge(base, fine, method, **params)
    assert merged["bn.running_var"].eq(1.5).all() and merged["bn.running_mean"].eq(2.0).all()
    assert merged["bn.num_batches_tracked"].item() == 7.0  # the base's count
    if method == "task_arithmetic":  # parameters still follow the method
        torch.testing.assert_close(merged["conv.weight"], BASE + 0.1 - 0.3)


def test_batchnorm_statistics_on_disk_and_keep_base_still_wins(tmp_path):
    """Guards: the rule holds when streaming, and an explicit keep_base rule overrides it."""
    base, fine = batchnorm_models()
    paths = []
    for i, state in enumerate([base, *fine]):
        paths.append(tmp_path / f"{i}.safetensors")
        save_file(state, paths[-1])
    merge_files(paths[0], paths[1:], tmp_path / "m.safetensors", "task_arithmetic", scale=1.0)
    assert load_file(tmp_path / "m.safetensors")["bn.running_var"].eq(1.5).all()
    merged = merge(base, fine, "task_arithmetic", rules={"keep_base": ["bn.running_*"]})
    assert merged["bn.running_var"].eq(100.0).all()


def test_adamerging_averages_statistics_instead_of_learning_coefficients_for_them():
    """Guards: AdaMerging is task arithmetic with learned coefficients; statistics follow the same rule."""
    model = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4)).eval()
    base = {k: v.detach().clone() for k, v in model.state_dict().items()}
    fine = [{**base, "0.weight": base["0.weight"] + 0.1 * (k + 1), "1.running_var": torch.full((4,), 1.0 + k)} for k in range(2)]
    forward = functional_forward(model.requires_grad_(False), [nn.Identity(), nn.Identity()])
    result = adamerging(base, fine, forward=forward, loaders=[[torch.randn(8, 4)]] * 2, steps=1)
    assert result.state_dict["1.running_var"].eq(1.5).all() and "1.running_var" not in result.coefficients
    assert "0.weight" in result.coefficients


def test_a_negative_merged_variance_is_an_error():
    """Guards: a negative variance in the output (from a corrupt fine-tune) passed silently."""
    base, fine = batchnorm_models(var_a=-9.0, var_b=2.0)
    with pytest.raises(UserError, match="'bn.running_var'.*negative"):
        merge(base, fine, "task_arithmetic")


# ---------------------------------------------------------------- write errors


@pytest.mark.parametrize(("target", "code"), [("os.write", errno.ENOSPC), ("tempfile.mkstemp", errno.EROFS), ("os.replace", errno.EDQUOT)])
def test_write_errors_are_one_line(pair, capsys, monkeypatch, target, code):
    """Guards: ENOSPC, EROFS (and, own case, EDQUOT at the rename) gave tracebacks."""
    module, name = target.split(".")
    real = getattr({"os": os, "tempfile": tempfile}[module], name)

    def broken(*args, **kwargs):
        if module == "os" and name == "write" and args[0] in (1, 2):
            return real(*args, **kwargs)
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(f"{target}", broken)
    before = files(pair)
    err = fail(capsys, *ARGS, "--out", "m.safetensors")
    assert ("m.safetensors" in err or "m.report.json" in err) and os.strerror(code) in err
    monkeypatch.undo()
    assert files(pair) == before and leftovers(pair) == []


def test_long_output_names(pair, capsys):
    """Guards: ENAMETOOLONG was a traceback; a name that fits the file system must still work
    although the hidden temp name is longer."""
    err = fail(capsys, *ARGS, "--out", "m" * 300 + ".safetensors")
    assert os.strerror(errno.ENAMETOOLONG) in err
    name = "m" * 243 + ".safetensors"  # 255 characters, and so is its report's name
    assert main(["merge", *ARGS, "--out", name]) == 0
    assert (pair / name).is_file() and leftovers(pair) == []


# ---------------------------------------------------------------- error messages stay one short line


def test_a_tensor_name_with_a_newline_stays_one_line(pair, capsys):
    """Guards (own case): user-controlled names (tensor names, paths) broke the one-line contract."""
    save_file({"w": BASE, "evil\nname": BASE.clone()}, pair / "b.safetensors")
    err = fail(capsys, *ARGS, "--out", "m.safetensors")
    assert "evil\\nname" in err


@pytest.mark.parametrize(
    "setting", ["seed=[" + ",".join(["1"] * 20000) + "]", "scale=[" + ",".join(["1"] * 20000) + "]"], ids=["config", "parameter"]
)
def test_huge_values_are_quoted_briefly(pair, capsys, setting):
    """Guards: config and parameter errors printed the whole offending value (an aliased YAML
    structure can be enormous)."""
    err = fail(capsys, *ARGS, "--out", "m.safetensors", "--set", setting)
    assert len(err) < 400


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_a_merge_output_gets_the_umasks_mode_not_0600(tmp_path, umask):
    """Issue 20: merge outputs were 0600 (mkstemp's mode) whatever the umask; now as any file the user writes."""
    import os
    import stat

    import torch
    from safetensors.torch import save_file

    from clpeft.merging import merge_files

    base = {"w": torch.zeros(3)}
    save_file(base, str(tmp_path / "b.safetensors"))
    save_file({"w": torch.ones(3)}, str(tmp_path / "a.safetensors"))
    old = os.umask(umask)
    try:
        merge_files(tmp_path / "b.safetensors", [tmp_path / "a.safetensors"], tmp_path / "m.safetensors", "task_arithmetic")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "m.safetensors").stat().st_mode) == 0o666 & ~umask
