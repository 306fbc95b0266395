"""``clpeft merge --search KEY=START:STOP:STEP --on CONFIG``: the value with the best validation accuracy wins.

The accuracies are recomputed here by hand (SimpleCIL on the merged one-layer MLP), independently of
the search's runs. Mutations checked once: ``max`` -> ``min`` in ``search_merge``'s choice, and the
final merge made with the first grid value; both fail the first test.
"""

from __future__ import annotations

import copy
import json
import re

import pytest
import torch
import yaml
from safetensors.torch import load_file

from clpeft import config
from clpeft.cli import main
from clpeft.engine import Engine
from clpeft.merging.search import parse_search
from clpeft.scenarios import datasets

DIGITS = {
    "seed": 0,
    "scenario": {"name": "class_incremental", "dataset": "sklearn_digits", "n_experiences": 2},
    "backbone": {"name": "mlp", "hidden": [32]},
    "strategy": {"name": "finetune"},
    "train": {"epochs": 1, "batch_size": 32, "lr": 0.05},
    "eval": {"baseline": False},
    "logging": {"tensorboard": False, "progress": "never"},
}
SCORE = {**DIGITS, "scenario": {**DIGITS["scenario"], "n_experiences": 1}, "strategy": {"name": "simplecil"}}


def prototype_accuracy(weight: torch.Tensor, bias: torch.Tensor, root) -> float:
    """SimpleCIL by hand on the one-layer MLP: class-mean features, nearest prototype by cosine."""
    train, test = datasets.load_dataset("sklearn_digits", root)

    def features(x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x.flatten(1).float() / 255.0 @ weight.t() + bias)

    f = features(train.inputs)
    prototypes = torch.stack([f[train.targets == c].mean(0) for c in range(10)])
    similarity = torch.nn.functional.normalize(features(test.inputs), dim=1) @ torch.nn.functional.normalize(prototypes, dim=1).t()
    return (similarity.argmax(1) == test.targets).double().mean().item()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """An untrained start and two fine-tunes of it, as run directories."""
    root = tmp_path_factory.mktemp("runs")
    paths = {}
    for name, change in [("base", {"strategy": {"name": "simplecil"}}), ("a", {}), ("b", {"train": {**DIGITS["train"], "lr": 0.2}})]:
        paths[name] = root / name
        Engine(config.resolve({**copy.deepcopy(DIGITS), **change}), paths[name], device="cpu").run()
    return paths


def test_search_picks_the_value_with_the_best_validation_accuracy(tmp_path, runs, capsys):
    score_config = tmp_path / "score.yaml"
    score_config.write_text(yaml.safe_dump(SCORE))
    out = tmp_path / "merged.safetensors"
    code = main(
        [
            "merge",
            "--base",
            str(runs["base"]),
            "--models",
            str(runs["a"]),
            str(runs["b"]),
            "--method",
            "task_arithmetic",
            "--set",
            'rules={skip: ["head.*", "stats.*"]}',
            "--out",
            str(out),
            "--search",
            "scale=0.05:0.3:0.05",
            "--on",
            str(score_config),
        ]
    )
    assert code == 0, capsys.readouterr().err
    assert "best scale = " in capsys.readouterr().out

    start, a, b = (load_file(runs[n] / "model.safetensors") for n in ("base", "a", "b"))
    names = ("backbone.net.0.weight", "backbone.net.0.bias")
    expected = {}
    for scale in (0.05, 0.1, 0.15, 0.2, 0.25, 0.3):  # the grid, STOP included
        weight, bias = (start[n] + scale * ((a[n] - start[n]) + (b[n] - start[n])) for n in names)
        expected[scale] = prototype_accuracy(weight, bias, tmp_path / "data")
    best = max(expected, key=expected.get)
    assert best not in (0.05, 0.3)  # inside the grid: neither end wins by position

    table = json.loads((tmp_path / "merged.search.json").read_text())
    assert table["parameter"] == "scale" and table["metric"] == "acc_last" and table["best"] == best
    assert [row["scale"] for row in table["table"]] == list(expected)
    for row in table["table"]:
        assert row["acc_last"] == pytest.approx(expected[row["scale"]], abs=1e-12)
    merged = load_file(out)
    for n in names:
        torch.testing.assert_close(merged[n], start[n] + best * ((a[n] - start[n]) + (b[n] - start[n])), rtol=0, atol=1e-6)
    report = json.loads((tmp_path / "merged.report.json").read_text())
    assert report["parameters"]["scale"] == best
    left = {p.name for p in tmp_path.iterdir()} - {"data"}
    assert left == {"merged.report.json", "merged.safetensors", "merged.search.json", "score.yaml"}  # no candidates


@pytest.mark.parametrize(
    ("text", "parsed"),
    [
        ("scale=0.3:1.5:0.1", ("scale", [round(0.3 + 0.1 * i, 1) for i in range(13)])),
        ("density=0.1, 0.2,0.5", ("density", [0.1, 0.2, 0.5])),
        ("scale=0.8:2.5:0.1", ("scale", [round(0.8 + 0.1 * i, 1) for i in range(18)])),
    ],
)
def test_grids_include_stop_and_are_the_decimals_given(text, parsed):
    assert parse_search(text) == parsed


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--search", "scale=0.3:1.5:0.1"], "--search and --on go together"),
        (["--search", "scale=1:0:0.1", "--on", "x.yaml"], "^--search: needs STEP > 0 and STOP >= START"),
        (["--search", "scale=a:b", "--on", "x.yaml"], "^--search: expects KEY=START:STOP:STEP"),
        (["--search", "sclae=0.1,0.2", "--on", "x.yaml"], "^--search: 'task_arithmetic' has no parameter 'sclae'"),
        (["--search", "scale=0.1,0.2", "--on", "x.yaml", "--set", "scale=0.5"], "'scale' is both set"),
        (["--method", "ties", "--search", "density=0.5,2", "--on", "x.yaml"], "^--search.density: input should be"),
    ],
)
def test_search_mistakes_are_one_line(tmp_path, model_files, capsys, args, message):
    base, paths = model_files
    flags = ["--base", str(base), "--models", *map(str, paths), "--method", "task_arithmetic", "--out", str(tmp_path / "m.safetensors")]
    assert main(["merge", *flags, *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and re.search(message, err.removeprefix("clpeft: error: ")), err
    assert not (tmp_path / "m.safetensors").exists()
