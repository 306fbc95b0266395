"""Multi-seed runs: ``clpeft run CONFIG --seeds 0,1,2`` and ``seeds:`` in the YAML.

Independent reference: numpy's mean and ``std(ddof=1)`` over the per-seed ``metrics.json``
files, which the engine wrote; the summary must match them, elementwise for list metrics.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

from clpeft.cli import main
from clpeft.tools.seed_summary import DDOF, mean_std


def _config(tmp_path, digits_run, **extra) -> str:
    """The conftest digits run, shortened: 3 experiences (4 + 3 + 3 classes), 1 epoch."""
    digits_run["train"]["epochs"] = 1
    digits_run["scenario"]["n_experiences"] = 3
    digits_run["scenario"]["init_classes"] = 4
    digits_run.update(extra)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(digits_run))
    return str(path)


DIGITS = {
    "seed": 0,
    "scenario": {"name": "class_incremental", "dataset": "sklearn_digits", "n_experiences": 5},
    "backbone": {"name": "mlp", "hidden": [64]},
    "strategy": {"name": "finetune"},
    "train": {"epochs": 3, "batch_size": 32, "lr": 0.05},
    "logging": {"tensorboard": False, "progress": "never"},
}


@pytest.fixture(scope="module")
def three_seeds(tmp_path_factory):
    import copy

    tmp = tmp_path_factory.mktemp("seeds")
    cfg = _config(tmp, copy.deepcopy(DIGITS))
    assert main(["run", cfg, "--seeds", "0,1,2", "--out", str(tmp / "ms")]) == 0
    return tmp / "ms"


def test_summary_equals_numpy_over_the_per_seed_metrics(three_seeds):
    summary = json.loads((three_seeds / "seeds_summary.json").read_text())
    runs = [json.loads((three_seeds / f"seed_{s}" / "metrics.json").read_text()) for s in (0, 1, 2)]
    assert summary["seeds"] == [0, 1, 2] and summary["ddof"] == 1 == DDOF
    # every reported metric is summarised; n/a ones (fwt of a class-incremental stream) stay out
    assert set(summary["metrics"]) == {k for k, v in runs[0]["metrics"].items() if v is not None}
    assert all(r["metrics"]["fwt"] is None for r in runs)
    for key, stat in summary["metrics"].items():
        values = np.array([r["metrics"][key] for r in runs], dtype=float)
        np.testing.assert_allclose(stat["mean"], values.mean(axis=0), rtol=0, atol=1e-12)
        np.testing.assert_allclose(stat["std"], values.std(axis=0, ddof=1), rtol=0, atol=1e-12)
    matrices = np.array([r["acc_matrix"] for r in runs])
    np.testing.assert_allclose(summary["acc_matrix"]["mean"], matrices.mean(axis=0), atol=1e-12)
    np.testing.assert_allclose(summary["acc_matrix"]["std"], matrices.std(axis=0, ddof=1), atol=1e-12)
    train_s = [r["timing"]["train_s"] for r in runs]
    np.testing.assert_allclose(summary["timing"]["train_s"]["mean"], np.mean(train_s))
    # the seeds really differ (otherwise std = 0 would pass anything)
    assert summary["metrics"]["acc_final"]["std"] > 0


def test_every_seed_is_an_ordinary_run_with_its_own_seed(three_seeds):
    for s in (0, 1, 2):
        stored = yaml.safe_load((three_seeds / f"seed_{s}" / "config.yaml").read_text())
        assert stored["seed"] == s and stored["seeds"] is None
    assert yaml.safe_load((three_seeds / "config.yaml").read_text())["seeds"] == [0, 1, 2]


def test_seeds_in_yaml_and_resume_keeps_finished_seeds(tmp_path, digits_run):
    cfg = _config(tmp_path, digits_run, seeds=[3, 4])
    out = tmp_path / "ms"
    assert main(["run", cfg, "--out", str(out)]) == 0
    first = json.loads((out / "seeds_summary.json").read_text())
    assert first["seeds"] == [3, 4]
    # seed 4 "crashed": no metrics.json; --resume reruns it from its checkpoints, seed 3 is read back
    finished = (out / "seed_3" / "metrics.json").stat().st_mtime_ns
    (out / "seed_4" / "metrics.json").unlink()
    assert main(["run", str(out), "--resume"]) == 0
    again = json.loads((out / "seeds_summary.json").read_text())
    assert again["metrics"] == first["metrics"]
    assert (out / "seed_3" / "metrics.json").stat().st_mtime_ns == finished


def test_single_seed_has_no_std():
    assert mean_std([0.5])["std"] is None
    assert mean_std([[0.1, 0.2], [0.3, 0.6]])["std"] == pytest.approx([np.std([0.1, 0.3], ddof=1), np.std([0.2, 0.6], ddof=1)])


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--seeds", "0,x"], "--seeds expects comma-separated integers"),
        (["--seeds", "0,0"], "seeds: 0 appears more than once"),
        (["--seeds", "1", "--seed", "2"], "not both"),
    ],
)
def test_bad_seed_arguments_exit_2(tmp_path, digits_run, capsys, argv, message):
    cfg = _config(tmp_path, digits_run)
    assert main(["run", cfg, "--out", str(tmp_path / "o"), *argv]) == 2
    assert message in capsys.readouterr().err


def test_existing_seed_runs_are_not_overwritten(tmp_path, digits_run, capsys):
    cfg = _config(tmp_path, digits_run)
    (tmp_path / "ms" / "seed_1").mkdir(parents=True)
    assert main(["run", cfg, "--seeds", "1", "--out", str(tmp_path / "ms")]) == 2
    assert "already holds seed runs" in capsys.readouterr().err
