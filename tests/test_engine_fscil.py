"""Few-shot class-incremental runs: session metrics (against a hand-worked example) and the
run directory's record of the drawn sessions."""

from __future__ import annotations

import json

import pytest

from clpeft import config
from clpeft.engine import Engine
from clpeft.metrics import few_shot_summary, tta_summary


def test_few_shot_metrics_equal_a_hand_worked_example():
    # 3 sessions; the base session's test set has 100 samples, the novel ones 10 and 20.
    R = [[0.9, 0.0, 0.0], [0.8, 0.5, 0.0], [0.7, 0.4, 0.6]]
    out = few_shot_summary(R, [100, 10, 20])
    # session accuracy = correct answers on all seen test data / its size
    assert out["session_acc"] == pytest.approx([90 / 100, (80 + 5) / 110, (70 + 4 + 12) / 130])
    assert out["session_acc_mean"] == pytest.approx((0.9 + 85 / 110 + 86 / 130) / 3)
    assert out["performance_drop"] == pytest.approx(0.9 - 86 / 130)
    assert out["base_acc"] == pytest.approx([0.8, 0.7])
    assert out["novel_acc"] == pytest.approx([0.5, (4 + 12) / 30])
    hm2 = 2 * 0.7 * (16 / 30) / (0.7 + 16 / 30)
    assert out["harmonic_mean"] == pytest.approx([2 * 0.8 * 0.5 / 1.3, hm2])
    assert (out["base_acc_last"], out["novel_acc_last"], out["harmonic_mean_last"]) == pytest.approx((0.7, 16 / 30, hm2))
    # no novel class learned: harmonic mean 0; one session: no novel metrics at all
    assert few_shot_summary([[1.0, 0.0], [0.6, 0.0]], [5, 5])["harmonic_mean"] == [0.0]
    single = few_shot_summary([[0.5]], [3])
    assert single["base_acc"] == [] and "harmonic_mean_last" not in single
    with pytest.raises(ValueError, match="one entry per experience"):
        few_shot_summary(R, [100, 10])


def test_tta_summary_is_the_mean_of_per_domain_errors():
    out = tta_summary([90, 30], [100, 50])
    assert out["error_per_domain"] == pytest.approx([0.1, 0.4])
    assert out["error_mean"] == pytest.approx(0.25) and out["error_overall"] == pytest.approx(30 / 150)
    with pytest.raises(ValueError, match="0 <= correct <= count"):
        tta_summary([3], [2])


def test_a_fscil_run_reports_session_metrics_and_records_its_sessions(tmp_path, digits_run):
    digits_run["scenario"] = {"name": "few_shot_class_incremental", "dataset": "sklearn_digits", "n_base": 4, "n_way": 2, "k_shot": 5}
    digits_run["train"]["epochs"] = 2
    out = tmp_path / "run"
    result = Engine(config.resolve(digits_run), out, device="cpu").run()
    m = result["metrics"]
    expected = few_shot_summary(result["acc_matrix"], result["test_sizes"])
    assert {k: m[k] for k in expected} == expected
    assert m["session_acc"] == m["acc_seen"] and len(m["harmonic_mean"]) == 3
    assert json.loads((out / "metrics.json").read_text())["metrics"]["harmonic_mean_last"] == m["harmonic_mean_last"]
    events = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    sessions = [e for e in events if e["event"] == "session"]
    assert [e["step"] for e in sessions] == [0, 1, 2, 3] and "novel_acc" not in sessions[0]
    assert [e["harmonic_mean"] for e in sessions[1:]] == m["harmonic_mean"]
    plan = json.loads((out / "fscil_sessions.json").read_text())
    assert [len(s["train_indices"]) for s in plan["sessions"][1:]] == [10, 10, 10]
    assert plan["class_order"] == list(range(10)) and plan["seed"] == 0
