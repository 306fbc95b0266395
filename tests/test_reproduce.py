"""``clpeft reproduce`` and ``docs/published_setups.md``: the registry, its checks, its side-by-side table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from clpeft import config
from clpeft.cli import main
from clpeft.tools.reproduce import load_setups, render_markdown

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"


def test_the_docs_page_is_rendered_from_the_registry():
    assert (ROOT / "docs" / "published_setups.md").read_text() == render_markdown(load_setups(CONFIGS)), (
        "regenerate with: clpeft reproduce --markdown > docs/published_setups.md"
    )


def test_every_setup_names_a_valid_config_and_existing_tests():
    setups = load_setups(CONFIGS)
    assert len({s.name for s in setups}) == len(setups) >= 6
    for setup in setups:
        config.load(CONFIGS / setup.config)  # valid as written
        for test in setup.proven_equal:
            file, _, name = test.partition("::")
            assert (ROOT / file).is_file(), (setup.name, test)
            assert not name or f"def {name}(" in (ROOT / file).read_text(), (setup.name, test)
        if setup.reported is not None:
            assert 0 < setup.reported.value <= 1 and setup.reported.source


@pytest.mark.parametrize(
    ("argv", "reason"),
    [
        (["reproduce", "l2p"], "needs a GPU (none here)"),
        (["reproduce", "l2p", "--device", "cpu"], "are not in the local Hugging Face cache and HF_HUB_OFFLINE is set"),
    ],
)
def test_a_setup_that_cannot_run_here_says_what_is_missing_in_one_line(tmp_path, capsys, monkeypatch, argv, reason):
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    assert main([*argv, "--out", str(tmp_path / "runs"), "--data-root", str(tmp_path / "data")]) == 2
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| l2p/")]
    assert [r.split(" | ")[0] for r in rows] == ["| l2p/cifar100_10t", "| l2p/imagenet_r_10t"]
    assert all("not run: " in r and reason in r for r in rows), rows
    assert not (tmp_path / "runs").exists()  # nothing started


def test_a_runnable_setup_runs_and_prints_paper_beside_clpeft(tmp_path, capsys):
    configs = tmp_path / "configs"
    (configs / "tiny").mkdir(parents=True)
    run = {
        "scenario": {"name": "class_incremental", "dataset": "sklearn_digits", "n_experiences": 2},
        "backbone": {"name": "mlp", "hidden": [16]},
        "strategy": {"name": "finetune"},
        "logging": {"tensorboard": False, "progress": "never"},
    }
    (configs / "tiny" / "digits.yaml").write_text(yaml.safe_dump(run))
    registry = {
        "setups": [
            {
                "config": "tiny/digits.yaml",
                "paper": "a tiny paper",
                "reported": {"metric": "acc_final", "value": 0.5, "source": "its table 1"},
                "official": {"repository": "x/y", "command": "python main.py"},
                "status": "test",
            }
        ]
    }
    (configs / "published_setups.yaml").write_text(yaml.safe_dump(registry))
    argv = ["reproduce", "--configs", str(configs), "--out", str(tmp_path / "runs"), "--device", "cpu", "--data-root", str(tmp_path)]
    assert main(argv) == 0
    ours = json.loads((tmp_path / "runs" / "tiny" / "digits" / "metrics.json").read_text())["metrics"]["acc_final"]
    row = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("| tiny/digits"))
    assert row == f"| tiny/digits | acc_final | 50.00 | {100 * ours:.2f} | {100 * (ours - 0.5):+.2f} |"
    assert main(argv) == 0  # a second call resumes the finished run instead of refusing its directory


def test_unknown_setup_names_are_one_line(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    assert main(["reproduce", "l2q", "--list"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no published setup 'l2q'; did you mean 'l2p" in err
