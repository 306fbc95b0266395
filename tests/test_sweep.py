"""``clpeft sweep``: grid points as run directories, honest tune/eval split, TensorBoard HParams.

Independent references: the best point is recomputed here from the points' own metrics.json;
the evaluation run's stored config must carry the best values and the evaluation overrides;
the HParams summary is read back with TensorBoard's own event reader and plugin decoder.
"""

from __future__ import annotations

import json

import pytest
import yaml

from clpeft.cli import main
from clpeft.tools.sweep import grid_points, parse_grid

DIGITS = {
    "seed": 0,
    "scenario": {"name": "class_incremental", "dataset": "sklearn_digits", "n_experiences": 3, "init_classes": 4},
    "backbone": {"name": "mlp", "hidden": [32]},
    "strategy": {"name": "finetune"},
    "train": {"epochs": 1, "batch_size": 32, "lr": 0.05},
    "logging": {"tensorboard": False, "progress": "never"},
}


@pytest.fixture
def config(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(DIGITS))
    return str(path)


def test_grid_is_the_cartesian_product_in_order():
    grid = parse_grid(["train.lr=[0.1, 0.01]", "strategy.name=[finetune, replay]"])
    assert grid_points(grid) == [
        {"train.lr": 0.1, "strategy.name": "finetune"},
        {"train.lr": 0.1, "strategy.name": "replay"},
        {"train.lr": 0.01, "strategy.name": "finetune"},
        {"train.lr": 0.01, "strategy.name": "replay"},
    ]


def test_tune_on_one_stream_and_evaluate_the_best_point_on_another(tmp_path, config, capsys):
    out = tmp_path / "sw"
    assert (
        main(
            [
                "sweep",
                config,
                "--grid",
                "train.lr=[0.2,0.05,0.0001]",
                "--metric",
                "acc_avg_incremental",
                "--tune-set",
                "scenario.class_order=1993",
                "--eval-set",
                "scenario.class_order=null",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    summary = json.loads((out / "sweep_summary.json").read_text())
    points = sorted((out / "tune").iterdir())
    assert len(points) == 3
    scores = {}
    for p in points:
        stored = yaml.safe_load((p / "config.yaml").read_text())
        assert stored["scenario"]["class_order"] == 1993  # tuned on the other class order
        scores[stored["train"]["lr"]] = json.loads((p / "metrics.json").read_text())["metrics"]["acc_avg_incremental"]
    best_lr = max(scores, key=scores.get)
    assert summary["best_values"] == {"train.lr": best_lr}
    assert scores[0.0001] < max(scores.values())  # a learning rate that barely learns is not chosen
    assert [row["mean"] for row in summary["points"]] == [scores[lr] for lr in (0.2, 0.05, 0.0001)]
    (eval_dir,) = list((out / "eval").iterdir())
    stored = yaml.safe_load((eval_dir / "config.yaml").read_text())
    assert stored["train"]["lr"] == best_lr and stored["scenario"]["class_order"] is None
    evaluated = json.loads((eval_dir / "metrics.json").read_text())["metrics"]["acc_avg_incremental"]
    assert summary["evaluation"]["mean"] == evaluated and not summary["tuned_on_evaluation_stream"]
    assert "the number to report" in (out / "sweep.md").read_text()


def test_sweep_without_a_tuning_stream_says_so_and_resume_keeps_points(tmp_path, config, capsys):
    out = tmp_path / "sw"
    argv = ["sweep", config, "--grid", "strategy.name=[finetune,replay]", "--metric", "forgetting", "--out", str(out)]
    assert main(argv) == 0
    summary = json.loads((out / "sweep_summary.json").read_text())
    assert summary["tuned_on_evaluation_stream"] and "evaluation" not in summary
    assert summary["best"] == min(summary["points"], key=lambda r: r["mean"])["name"]  # forgetting: lower is better
    assert "overstates" in capsys.readouterr().out
    stamp = {p.name: (p / "metrics.json").stat().st_mtime_ns for p in out.iterdir() if p.is_dir()}
    assert main(argv) == 2  # points exist: refuse to overwrite
    assert main([*argv, "--resume"]) == 0
    assert {p.name: (p / "metrics.json").stat().st_mtime_ns for p in out.iterdir() if p.is_dir()} == stamp


@pytest.mark.parametrize(
    "grid, message",
    [
        ("train.lr=0.1", "expected a non-empty list"),
        ("train.lr=[]", "expected a non-empty list"),
        ("train.lrr=[0.1]", "train.lrr: unknown key"),
        ("train.lr=[0.1,-1]", "train.lr: input should be greater than 0"),
    ],
)
def test_bad_grids_exit_2_before_anything_runs(tmp_path, config, capsys, grid, message):
    assert main(["sweep", config, "--grid", grid, "--out", str(tmp_path / "sw")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "sw").exists()


def test_hparams_summary_holds_the_flattened_config_and_final_metrics(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    from clpeft.logging import RunLogger

    log = RunLogger(tmp_path, tensorboard=True, progress="never")
    log.hparams(
        {"train": {"lr": 0.05, "optimizer": "sgd"}, "scenario": {"class_order": [2, 0, 1], "root": None}},
        {"acc_final": 0.75, "acc_seen": [0.9, 0.75], "bwt": -0.125},
    )
    log.close()
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    content = acc.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info
    values = {k: v.WhichOneof("kind") and getattr(v, v.WhichOneof("kind")) for k, v in start.hparams.items()}
    assert values == {"train.lr": 0.05, "train.optimizer": "sgd", "scenario.class_order": "[2, 0, 1]", "scenario.root": "null"}
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
    assert sorted(m.name.tag for m in experiment.metric_infos) == ["hparams/acc_final", "hparams/bwt"]
    assert acc.Scalars("hparams/acc_final")[0].value == 0.75
