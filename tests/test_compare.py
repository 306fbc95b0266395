"""``clpeft compare``: the methods x metrics table, checked against the runs' own metrics.json.

Independent reference: the values are read back from each run's ``metrics.json`` (single run)
or ``seed_<n>/metrics.json`` (multi-seed) and averaged with numpy here.
"""

from __future__ import annotations

import csv
import io
import json

import numpy as np
import pytest
import yaml

from clpeft.cli import main

DIGITS = {
    "seed": 0,
    "scenario": {"name": "class_incremental", "dataset": "sklearn_digits", "n_experiences": 3, "init_classes": 4},
    "backbone": {"name": "mlp", "hidden": [64]},
    "strategy": {"name": "finetune"},
    "train": {"epochs": 1, "batch_size": 32, "lr": 0.05},
    "logging": {"tensorboard": False, "progress": "never"},
}


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory):
    """A single finetune run and a two-seed replay run."""
    tmp = tmp_path_factory.mktemp("compare")
    cfg = tmp / "c.yaml"
    cfg.write_text(yaml.safe_dump(DIGITS))
    assert main(["run", str(cfg), "--out", str(tmp / "ft")]) == 0
    assert main(["run", str(cfg), "--out", str(tmp / "rp"), "--seeds", "0,1", "--set", "strategy={name: replay, mem_size: 100}"]) == 0
    return tmp / "ft", tmp / "rp"


def _metrics(run_dir):
    if (run_dir / "metrics.json").is_file():
        return [json.loads((run_dir / "metrics.json").read_text())]
    return [json.loads(p.read_text()) for p in sorted(run_dir.glob("seed_*/metrics.json"))]


def test_csv_values_are_the_runs_metrics(two_runs, tmp_path, capsys):
    out_csv = tmp_path / "t.csv"
    assert main(["compare", *map(str, two_runs), "--csv", str(out_csv)]) == 0
    rows = list(csv.DictReader(io.StringIO(out_csv.read_text())))
    assert [r["run"] for r in rows] == ["ft", "rp"] and [r["method"] for r in rows] == ["finetune", "replay"]
    assert [r["seeds"] for r in rows] == ["1", "2"]
    for row, run_dir in zip(rows, two_runs):
        runs = _metrics(run_dir)
        assert all(r["metrics"]["fwt"] is None for r in runs) and row.get("fwt_mean", "") == ""  # n/a in class-incremental
        for key in ("acc_final", "acc_last", "acc_avg_incremental", "bwt", "forgetting"):
            values = 100 * np.array([r["metrics"][key] for r in runs])
            assert float(row[f"{key}_mean"]) == pytest.approx(values.mean(), abs=1e-9)
            if len(runs) > 1:
                assert float(row[f"{key}_std"]) == pytest.approx(values.std(ddof=1), abs=1e-9)
            else:
                assert row[f"{key}_std"] == ""
        wall = [r["timing"]["train_s"] + r["timing"]["eval_s"] for r in runs]
        assert float(row["wall_s_mean"]) == pytest.approx(np.mean(wall))
        assert int(row["trainable_params"]) == runs[0]["parameters"]["trainable"]
    # replay keeps more of the old classes than plain finetuning on this stream
    assert float(rows[1]["acc_final_mean"]) > float(rows[0]["acc_final_mean"])


def test_markdown_table_and_definitions(two_runs, capsys):
    assert main(["compare", *map(str, two_runs), "--fraction"]) == 0
    text = capsys.readouterr().out
    lines = [line for line in text.splitlines() if line.startswith("| ft ") or line.startswith("| rp ")]
    ft = _metrics(two_runs[0])[0]["metrics"]
    rp = np.array([r["metrics"]["acc_final"] for r in _metrics(two_runs[1])])
    assert f"| {ft['acc_final']:.4f} |" in lines[0]
    assert f"{rp.mean():.4f} ± {rp.std(ddof=1):.4f}" in lines[1]
    assert "forgetting: 1/(T-1) sum_j<T-1 max_l<T-1 R[l,j] - R[T-1,j] (Chaudhry 2018)" in text
    assert "ddof=1" in text and "Lopez-Paz & Ranzato" in text


def test_not_a_run_directory_exits_2(tmp_path, capsys):
    assert main(["compare", str(tmp_path)]) == 2
    assert f"{tmp_path}: no metrics.json" in capsys.readouterr().err
