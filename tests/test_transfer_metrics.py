"""FWT means transfer or reads n/a; one experience reads n/a, not 0 (issue 20, item 1).

Before: the baseline ``b`` was the accuracy of a head grown from whatever random state the
strategy's constructor left, so two methods with the same seed reported different FWT for the
same untrained model (-5.88 vs -16.00), and in a class-incremental stream ``R[j-1, j]`` scores
classes the model has no output for yet, so FWT there only measured the untrained head.
"""

from __future__ import annotations

import json

import pytest
import yaml

from clpeft import metrics
from clpeft.cli import main

DOMAINS = {
    "seed": 3,
    "scenario": {"name": "domain_incremental", "dataset": "sklearn_digits", "domains": [{}, {"rotation": 30}, {"rotation": 60}]},
    "backbone": {"name": "mlp", "hidden": [16]},
    "train": {"epochs": 1, "batch_size": 64},
    "logging": {"tensorboard": False, "progress": "never"},
}


def _run(tmp_path, name, data, *extra) -> dict:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    assert main(["run", str(path), "--out", str(tmp_path / name), *extra]) == 0
    return json.loads((tmp_path / name / "metrics.json").read_text())


@pytest.mark.parametrize(
    ("classes", "measurable"),
    [
        ([[0, 1], [0, 1], [0, 1]], True),  # domain-incremental: one label space
        ([[0, 1], [2, 3], [4, 5]], False),  # class-incremental: nothing to predict before training
        ([[0, 1], [1, 2], [3]], False),  # one experience of new classes only is enough to lose it
        ([[0, 1], [1, 2], [2, 3]], True),  # blurry boundaries: each shares a class with the past
        ([[0]], True),
    ],
)
def test_transfer_is_measurable_only_when_each_experience_shares_a_class(classes, measurable):
    assert metrics.transfer_is_measurable(classes) is measurable


DRAWS_FIRST = """
import torch
from clpeft import Strategy


class DrawsFirst(Strategy):
    \"\"\"Plain fine-tuning whose constructor consumes random numbers (as a random projection would).\"\"\"

    def __init__(self, backbone, draws: int = 1000):
        super().__init__(backbone)
        torch.randn(draws)
"""


def test_two_methods_with_one_seed_share_one_baseline_and_fwt_uses_it(tmp_path):
    (tmp_path / "draws.py").write_text(DRAWS_FIRST)
    a = _run(tmp_path, "finetune", {**DOMAINS, "strategy": {"name": "finetune"}})
    b = _run(tmp_path, "draws", {**DOMAINS, "strategy": {"name": str(tmp_path / "draws.py") + ":DrawsFirst"}})
    assert a["baseline"] == b["baseline"]  # was: each method's own random head
    for result in (a, b):
        R, base = result["acc_matrix"], result["baseline"]
        assert result["metrics"]["fwt"] == pytest.approx(sum(R[j - 1][j] - base[j] for j in (1, 2)) / 2, abs=1e-12)


def test_class_incremental_fwt_is_na_and_the_baseline_row_is_kept(tmp_path, capsys):
    data = {
        **DOMAINS,
        "scenario": {"name": "class_incremental", "dataset": "sklearn_digits", "n_experiences": 2},
        "strategy": {"name": "finetune"},
    }
    result = _run(tmp_path, "cil", data)
    assert result["metrics"]["fwt"] is None and len(result["baseline"]) == 2
    assert main(["report", str(tmp_path / "cil")]) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.strip().startswith("fwt"))
    assert "n/a" in line


def test_one_experience_reports_na_not_zero(tmp_path, capsys):
    data = {
        **DOMAINS,
        "scenario": {"name": "class_incremental", "dataset": "sklearn_digits", "n_experiences": 1},
        "strategy": {"name": "finetune"},
    }
    result = _run(tmp_path, "one", data)
    assert [result["metrics"][k] for k in ("bwt", "forgetting", "fwt")] == [None, None, None]
    out = capsys.readouterr().out
    for key in ("bwt", "forgetting"):
        assert next(ln for ln in out.splitlines() if ln.strip().startswith(key)).split()[1] == "n/a"
