"""Reports that fit each scenario: ``clpeft run``, ``compare`` and ``report`` for test-time
adaptation (per domain, continual vs reset), few-shot sessions (base/novel/harmonic mean) and
class-incremental runs (old/new per step, per class, confusion), and the cache fill apart.

Independent references: the breakdowns worked by hand on small matrices, and every printed
number read back from the runs' own ``metrics.json`` here.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import yaml
from PIL import Image

from clpeft.cli import main
from clpeft.tools import report
from clpeft.tools.breakdowns import (
    few_shot_sessions,
    old_new_accuracy,
    per_class_accuracy,
)

BASE = {
    "seed": 0,
    "backbone": {"name": "mlp", "hidden": [32]},
    "strategy": {"name": "finetune"},
    "train": {"epochs": 1, "batch_size": 32, "lr": 0.05},
    "logging": {"tensorboard": False, "progress": "never"},
}
CIL = {"name": "class_incremental", "dataset": "sklearn_digits", "n_experiences": 3, "init_classes": 4}
FSCIL = {"name": "few_shot_class_incremental", "dataset": "sklearn_digits", "n_base": 4, "n_way": 2, "k_shot": 5}
TTA = {
    "name": "test_time_adaptation",
    "dataset": "sklearn_digits",
    "corruptions": ["gaussian_noise", "fog", "contrast"],
    "severity": 5,
    "train_per_class": 24,
    "test_per_class": 8,
}


def _run(tmp, name, scenario, strategy=None, backbone=None, extra=()):
    cfg = {**BASE, "scenario": scenario, **({"strategy": strategy} if strategy else {}), **({"backbone": backbone} if backbone else {})}
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["run", str(path), "--out", str(tmp / name), "--device", "cpu", *extra]) == 0
    return tmp / name


def _metrics(run_dir):
    return json.loads((run_dir / "metrics.json").read_text())


# ---------------------------------------------------------------- hand computations


def test_old_new_accuracy_by_hand():
    R = [[0.9, 0.0, 0.0], [0.8, 0.5, 0.0], [0.7, 0.4, 0.6]]
    old, new = old_new_accuracy(R, [100, 10, 20])
    assert old[0] is None and old[1] == pytest.approx(0.8)
    assert old[2] == pytest.approx((100 * 0.7 + 10 * 0.4) / 110)
    assert new == pytest.approx([0.9, 0.5, 0.6])


def test_few_shot_sessions_by_hand():
    R = [[0.9, 0.0, 0.0], [0.8, 0.5, 0.0], [0.7, 0.4, 0.6]]
    s = few_shot_sessions({"acc_matrix": R, "test_sizes": [100, 10, 20]})
    assert s["session_acc"] == pytest.approx([0.9, 85 / 110, 86 / 130])
    assert s["base_acc"][0] is None and s["base_acc"][1:] == pytest.approx([0.8, 0.7])
    assert s["novel_acc"][1:] == pytest.approx([0.5, (10 * 0.4 + 20 * 0.6) / 30])
    b, n = 0.7, 16 / 30
    assert s["harmonic_mean"][1:] == pytest.approx([2 * 0.8 * 0.5 / 1.3, 2 * b * n / (b + n)])


def test_per_class_accuracy_by_hand():
    assert per_class_accuracy([[3, 1, 0], [2, 2, 0], [0, 0, 0]]) == [0.75, 0.5, None]


# ---------------------------------------------------------------- test-time adaptation


@pytest.fixture(scope="module")
def tta_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tta")
    cnn, tent = {"name": "cnn", "widths": [8, 16]}, {"name": "tent"}
    continual = _run(tmp, "continual", TTA, tent, cnn)
    reset = _run(tmp, "reset", {**TTA, "reset_each_domain": True}, tent, cnn)
    return continual, reset


def test_compare_puts_continual_and_reset_side_by_side_per_domain(tta_runs, capsys):
    assert main(["compare", *map(str, tta_runs)]) == 0
    text = capsys.readouterr().out
    table = text.split("Online error per domain (%):\n")[1].split("\n\n")[0].splitlines()
    assert table[0] == "| domain | tent (continual), seed 0 | tent (reset), seed 0 |"
    continual, reset = (_metrics(d) for d in tta_runs)
    assert continual["domains"] == ["gaussian_noise@5", "fog@5", "contrast@5"]
    for k, domain in enumerate(continual["domains"]):
        a, b = continual["metrics"]["error_per_domain"][k], reset["metrics"]["error_per_domain"][k]
        assert table[2 + k] == f"| {domain} | {100 * a:.2f} | {100 * b:.2f} |"
    assert table[-1] == f"| mean | {100 * continual['metrics']['error_mean']:.2f} | {100 * reset['metrics']['error_mean']:.2f} |"
    assert "| continual | tent (continual) |" in text and "| reset | tent (reset) |" in text  # the main table
    assert "reset: each domain starts from the source model" in text


def test_report_plots_the_error_per_domain_with_the_corruption_names(tta_runs, tmp_path, monkeypatch):
    drawn = {}
    figure = report.domain_errors_figure

    def recording(domains, errors):
        fig = figure(domains, errors)
        drawn["ticks"] = [t.get_text() for t in fig.axes[0].get_xticklabels()]
        drawn["legend"] = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
        return fig

    monkeypatch.setattr(report, "domain_errors_figure", recording)
    assert main(["report", *map(str, tta_runs), "--out", str(tmp_path)]) == 0
    assert drawn["ticks"] == ["gaussian_noise@5", "fog@5", "contrast@5"]
    assert drawn["legend"] == ["tent (continual), seed 0", "tent (reset), seed 0"]
    with Image.open(tmp_path / "domain_errors.png") as im:
        assert im.format == "PNG" and min(im.size) > 100
    assert not list(tmp_path.glob("acc_matrix*.png"))  # one online row per run: the per-domain view replaces it
    page = (tmp_path / "report.html").read_text()
    assert "<h2>Online error per domain (%)</h2>" in page and '<td class="label">fog@5</td>' in page


# ---------------------------------------------------------------- few-shot class-incremental


@pytest.fixture(scope="module")
def fscil_run(tmp_path_factory):
    return _run(tmp_path_factory.mktemp("fscil"), "fs", FSCIL, extra=["--set", "train.epochs=2"])


def test_run_prints_sessions_with_base_novel_and_harmonic_mean(tmp_path, capsys):
    out = _run(tmp_path, "fs", FSCIL)
    printed = capsys.readouterr().out
    result = _metrics(out)
    m = result["metrics"]
    assert "session  acc (seen)    base   novel  harmonic mean" in printed
    for i in range(1, len(m["session_acc"])):
        b, n, h = m["base_acc"][i - 1], m["novel_acc"][i - 1], m["harmonic_mean"][i - 1]
        assert f"{i:>7}  {m['session_acc'][i]:10.3f}  {b:6.3f}  {n:6.3f}  {h:13.3f}" in printed
    assert f"harmonic_mean_last  {m['harmonic_mean_last']:+.4f}" in printed


def test_compare_shows_sessions_and_derives_them_for_older_files(fscil_run, tmp_path, capsys):
    old = tmp_path / "old"
    shutil.copytree(fscil_run, old)
    data = _metrics(old)
    for key in (
        "session_acc",
        "session_acc_mean",
        "performance_drop",
        "base_acc",
        "novel_acc",
        "harmonic_mean",
        "base_acc_last",
        "novel_acc_last",
        "harmonic_mean_last",
    ):
        del data["metrics"][key]
    (old / "metrics.json").write_text(json.dumps(data))
    assert main(["compare", str(fscil_run), str(old)]) == 0
    text = capsys.readouterr().out
    m = _metrics(fscil_run)["metrics"]
    rows = [line for line in text.splitlines() if line.startswith(("| fs ", "| old "))]
    assert len(rows) == 2 and all(f"| {100 * m['harmonic_mean_last']:.2f} |" in row for row in rows)
    sessions = text.split("Accuracy per session (%):\n")[1].split("\n\n")[0].splitlines()
    assert sessions[0] == "| method | session | acc (seen) | base | novel | harmonic mean |"
    assert sessions[2] == f"| finetune, seed 0 [fs] | 0 | {100 * m['session_acc'][0]:.2f} | – | – | – |"
    assert sessions[3] == (
        f"| finetune, seed 0 [fs] | 1 | {100 * m['session_acc'][1]:.2f} | {100 * m['base_acc'][0]:.2f} | "
        f"{100 * m['novel_acc'][0]:.2f} | {100 * m['harmonic_mean'][0]:.2f} |"
    )
    assert sessions[3].split("|")[3:] == sessions[3 + len(m["session_acc"])].split("|")[3:]  # the derived copy


def test_report_has_session_plots_and_section(fscil_run):
    assert main(["report", str(fscil_run)]) == 0
    for name in ("sessions", "base_novel", "acc_matrix"):
        assert (fscil_run / f"{name}.png").is_file()
    page = (fscil_run / "report.html").read_text()
    assert "<h2>Few-shot sessions (%)</h2>" in page and "harmonic mean" in page


# ---------------------------------------------------------------- class-incremental


@pytest.fixture(scope="module")
def cil_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("cil")
    return _run(tmp, "d1", CIL), _run(tmp, "d2", CIL, {"name": "replay", "mem_size": 40})


def test_report_shows_old_new_per_step_and_per_class_accuracy(cil_runs, capsys):
    assert main(["report", str(cil_runs[0])]) == 0
    text = capsys.readouterr().out
    result = _metrics(cil_runs[0])
    R, n = np.asarray(result["acc_matrix"]), result["test_sizes"]
    old2 = (n[0] * R[2, 0] + n[1] * R[2, 1]) / (n[0] + n[1])
    assert f" exp2  {old2:11.3f}  {R[2, 2]:9.3f}" in text
    C = np.asarray(result["final_confusion"])
    assert C.sum() == sum(n) and C.shape == (10, 10)
    assert f"{result['class_names'][0]:>1}  {C[0, 0] / C[0].sum():6.3f}  ({C[0].sum()} test samples)" in text
    for name in ("old_new", "confusion", "per_class"):
        assert (cil_runs[0] / f"{name}.png").is_file()
    page = (cil_runs[0] / "report.html").read_text()
    assert "<h2>Old and new experiences</h2>" in page and "<h2>Per-class accuracy and confusion after the last step</h2>" in page


def test_legends_name_methods_and_seeds_not_directories(cil_runs, tmp_path, monkeypatch):
    seen = []
    curves = report.curves_figure

    def recording(data, *args, **kwargs):
        seen.append(list(data))
        return curves(data, *args, **kwargs)

    monkeypatch.setattr(report, "curves_figure", recording)
    assert main(["report", *map(str, cil_runs), "--out", str(tmp_path)]) == 0
    assert ["finetune, seed 0", "replay, seed 0"] in seen  # acc_seen and forgetting
    assert ["finetune, seed 0: old", "finetune, seed 0: new", "replay, seed 0: old", "replay, seed 0: new"] in seen
    assert not any("d1" in label or "d2" in label for labels in seen for label in labels)


def test_a_file_without_final_confusion_still_reports(cil_runs, tmp_path, capsys):
    old = tmp_path / "old"
    shutil.copytree(cil_runs[0], old)
    for png in old.glob("*.png"):
        png.unlink()
    data = _metrics(old)
    del data["final_confusion"]
    (old / "metrics.json").write_text(json.dumps(data))
    assert main(["report", str(old)]) == 0
    assert "accuracy per class" not in capsys.readouterr().out
    assert (old / "old_new.png").is_file() and not (old / "confusion.png").exists()


# ---------------------------------------------------------------- timing


def test_compare_shows_the_cache_fill_apart_from_the_wall_time(cil_runs, tmp_path, capsys):
    first, second = tmp_path / "first", tmp_path / "second"
    for src, dst, timing in (
        (cil_runs[0], first, {"train_s": 0.9, "eval_s": 0.3, "cache_s": 71.2}),
        (cil_runs[1], second, {"train_s": 0.9, "eval_s": 0.3}),
    ):  # a file from before cache_s
        shutil.copytree(src, dst)
        data = _metrics(dst)
        data["timing"] = {**{k: v for k, v in data["timing"].items() if k != "cache_s"}, **timing}
        (dst / "metrics.json").write_text(json.dumps(data))
    assert main(["compare", str(first), str(second)]) == 0
    text = capsys.readouterr().out
    header = next(line for line in text.splitlines() if line.startswith("| run "))
    cells = [c.strip() for c in header.strip("|").split("|")]
    wall, cache = cells.index("wall time (s)"), cells.index("cache fill (s)")
    rows = {
        line.split("|")[1].strip(): [c.strip() for c in line.strip().strip("|").split("|")]
        for line in text.splitlines()
        if line.startswith(("| first ", "| second "))
    }
    assert (rows["first"][wall], rows["first"][cache]) == ("1.2", "71.2")
    assert (rows["second"][wall], rows["second"][cache]) == ("1.2", "–")


# ---------------------------------------------------------------- online streams


@pytest.fixture(scope="module")
def online_runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("online")
    scenario = {**CIL, "n_experiences": 2, "init_classes": None, "online": True, "eval_every": 150}
    return [
        _run(tmp, name, scenario, {"name": name, **({"mem_size": 100} if name == "replay" else {})}, extra=("--set", "train.batch_size=10"))
        for name in ("finetune", "replay")
    ]


def test_compare_and_report_show_the_online_metrics_and_the_anytime_curve(online_runs, tmp_path, monkeypatch, capsys):
    """A_auc, the last anytime accuracy and the throughput are compare columns (from metrics.json);
    ``anytime.png`` draws each run's anytime curve at its own sample counts."""
    assert main(["compare", *map(str, online_runs), "--csv", str(tmp_path / "table.csv")]) == 0
    header, *lines = [line.split(",") for line in (tmp_path / "table.csv").read_text().strip().splitlines()]
    for run_dir, line in zip(online_runs, lines):
        m = _metrics(run_dir)["metrics"]
        row = dict(zip(header, line))
        assert float(row["a_auc_mean"]) == pytest.approx(100 * m["a_auc"], abs=1e-3)
        assert float(row["acc_anytime_last_mean"]) == pytest.approx(100 * m["acc_anytime_last"], abs=1e-3)
        assert float(row["samples_per_s_mean"]) == pytest.approx(m["samples_per_s"], rel=1e-3)
    drawn = {}
    figure = report.anytime_figure

    def recording(curves):
        fig = figure(curves)
        drawn["lines"] = {line.get_label(): line.get_xydata().tolist() for line in fig.axes[0].get_lines()}
        return fig

    monkeypatch.setattr(report, "anytime_figure", recording)
    assert main(["report", *map(str, online_runs), "--out", str(tmp_path)]) == 0
    expected = {f"{name}, seed 0": _metrics(d)["metrics"]["anytime_curve"] for name, d in zip(("finetune", "replay"), online_runs)}
    assert set(drawn["lines"]) == set(expected)
    for label, points in expected.items():
        assert np.allclose(drawn["lines"][label], points)
    assert (tmp_path / "anytime.png").is_file()
