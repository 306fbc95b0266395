"""``clpeft bench``: measured step times, the full-run estimate, and no run directory written."""

from __future__ import annotations

import time

import pytest

from clpeft import config
from clpeft.cli import main
from clpeft.strategy import Strategy
from clpeft.tools.bench import bench, format_bench


def _stream_sizes(cfg):
    scenario = cfg.scenario.cls(seed=cfg.seed, **cfg.scenario.params)
    stream = scenario.experiences()
    return [len(e.train) for e in stream], [len(e.test) for e in stream]


def test_bench_times_real_steps_and_extrapolates(digits_run, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    original = Strategy.training_step

    def slow_step(self, batch):  # 20 ms per step: the bench must see it
        time.sleep(0.02)
        return original(self, batch)

    monkeypatch.setattr(Strategy, "training_step", slow_step)
    cfg = config.resolve(digits_run)
    result = bench(cfg, device="cpu", steps=4, warmup=1)
    assert result.steps == 4
    assert result.step_s >= 0.02
    assert result.train_samples_per_s <= cfg.train.batch_size / 0.02
    assert result.cache_s is None  # trainable backbone: no feature cache
    train_sizes, test_sizes = _stream_sizes(cfg)
    expected_train = cfg.train.epochs * sum(train_sizes) / result.train_samples_per_s + len(train_sizes) * result.after_experience_s
    assert result.estimated_train_s == pytest.approx(expected_train)
    rows = len(test_sizes) + 1  # eval.baseline is on by default
    assert result.estimated_eval_s == pytest.approx(rows * sum(test_sizes) / result.eval_samples_per_s)
    assert list(tmp_path.iterdir()) == []  # no run directory, no files


def test_closed_form_method_reports_no_gradient_steps(digits_run):
    digits_run["strategy"] = {"name": "simplecil"}
    digits_run["backbone"]["freeze"] = True
    digits_run["train"]["feature_cache"] = "memory"
    result = bench(config.resolve(digits_run), device="cpu", steps=3)
    assert result.step_s is None and result.steps == 0
    assert result.cache_s is not None and result.cache_s >= 0
    assert result.estimated_train_s == pytest.approx(5 * result.after_experience_s + result.cache_s * 5, rel=0.25)
    assert "no gradient steps" in format_bench(result)


def test_bench_cli_rejects_zero_steps_in_one_line(digits_run, tmp_path, capsys):
    import yaml

    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(digits_run))
    assert main(["bench", str(path), "--steps", "0", "--device", "cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["clpeft: error: --steps must be >= 1 and --warmup >= 0 (got 0 and 3)"]


def test_bench_times_online_adaptation_on_a_test_time_adaptation_config(digits_run, monkeypatch):
    """Was a TypeError (a TTA domain has no training data); now: source steps, then ``adapt`` batches."""
    from clpeft.strategies.tent import Tent

    calls = []
    original = Tent.adapt

    def slow_adapt(self, x):  # 20 ms per batch: the bench must see it
        calls.append(len(x))
        time.sleep(0.02)
        return original(self, x)

    monkeypatch.setattr(Tent, "adapt", slow_adapt)
    digits_run["scenario"] = {
        "name": "test_time_adaptation",
        "dataset": "sklearn_digits",
        "test_per_class": 20,
        "corruptions": ["gaussian_noise", "fog"],
        "severity": 5,
    }
    digits_run["backbone"] = {"name": "cnn"}
    digits_run["strategy"] = {"name": "tent"}
    digits_run["train"].update(batch_size=16)
    cfg = config.resolve(digits_run)
    result = bench(cfg, device="cpu", steps=3, warmup=1)
    assert result.adapts_online and result.steps == 3 and result.step_s > 0  # the source model's steps
    assert calls == [16] * 4  # one untimed batch, then three timed, in stream order
    assert result.eval_samples_per_s <= 16 / 0.02
    scenario = cfg.scenario.cls(seed=cfg.seed, **cfg.scenario.params)
    domains = scenario.experiences()
    assert result.estimated_eval_s == pytest.approx(sum(len(d.test) for d in domains) / result.eval_samples_per_s)
    assert "adaptation (online)" in format_bench(result)
