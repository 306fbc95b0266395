"""Every shipped config validates, so a user's first `clpeft validate` never fails on ours."""

from __future__ import annotations

from pathlib import Path

import pytest

from clpeft.cli import main

REGISTRY = "published_setups.yaml"  # the list of published setups (tests/test_reproduce.py), not a run config
CONFIGS = sorted(p for p in (Path(__file__).resolve().parents[1] / "configs").rglob("*.yaml") if p.name != REGISTRY)


def test_every_method_folder_has_a_config_that_runs_offline():
    """The parametrised test below would pass on an empty list: every configs/<folder>/ must be seen,
    and each must hold a config that runs on this machine's offline data (digits, Fashion-MNIST, text)."""
    folders = sorted({p.parent.name for p in CONFIGS if p.parent.name != "configs"})
    # configs/merge holds mergekit YAMLs (*.yml, not run configs; tests/merging/test_mergekit_yaml.py runs them)
    expected = sorted(d.name for d in (Path(__file__).resolve().parents[1] / "configs").iterdir() if d.is_dir() and d.name != "merge")
    assert folders == expected and len(folders) >= 15
    offline = ("offline", "digits", "fmnist", "chatterbot", "rotten")
    for folder in folders:
        assert any(any(w in p.stem for w in offline) for p in CONFIGS if p.parent.name == folder), folder


OFFLINE = [p for p in CONFIGS if any(w in p.stem for w in ("offline", "digits", "fmnist", "chatterbot", "rotten"))]


def test_offline_configs_name_packaged_weights_that_exist():
    """--config-only does not build backbones, so a misspelt offline weights name (``img - focus``)
    passed it; every timm backbone of an offline config must name a packaged weight file."""
    import yaml

    from clpeft.backbones.offline_weights import OFFLINE_WEIGHTS

    named = {p: yaml.safe_load(p.read_text()).get("backbone", {}) for p in OFFLINE}
    timm = {p: b["weights"] for p, b in named.items() if b.get("name") == "timm" and isinstance(b.get("weights"), str)}
    assert len(timm) >= 10
    assert {p.name: w for p, w in timm.items() if w not in OFFLINE_WEIGHTS} == {}


@pytest.mark.slow
@pytest.mark.parametrize("path", OFFLINE, ids=[str(p.relative_to(p.parents[1])) for p in OFFLINE])
def test_offline_config_builds_here(path, capsys, monkeypatch):
    """The full check (data, backbone, strategy built, no training) of every config said to run offline."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert main(["validate", str(path)]) == 0, capsys.readouterr().err


@pytest.mark.parametrize("path", CONFIGS, ids=[str(p.relative_to(p.parents[1])) for p in CONFIGS])
def test_shipped_config_validates(path, capsys):
    assert main(["validate", str(path), "--config-only"]) == 0, capsys.readouterr().err


def test_validate_builds_what_a_run_builds_and_says_what_is_missing(tmp_path, capsys, monkeypatch):
    """Issue 20: validate passed configs that run then rejected (missing data root, classes that do not
    split, a missing weights package); it now builds the data, backbone and strategy, without training."""
    import yaml

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    root = Path(__file__).resolve().parents[1] / "configs"
    assert main(["validate", str(root / "baselines" / "digits_replay.yaml")]) == 0  # offline: data and model here
    capsys.readouterr()
    run = yaml.safe_load((root / "baselines" / "digits_replay.yaml").read_text())
    cases = {
        "no data": (
            {"name": "class_incremental", "dataset": "image_folder", "root": str(tmp_path / "absent"), "n_experiences": 2},
            "scenario.root",
        ),
        "does not split": (
            {"name": "class_incremental", "dataset": "npz", "root": str(tmp_path / "three.npz"), "n_experiences": 2},
            "do not split into 2 equal experiences",
        ),
    }
    import numpy as np

    np.savez(tmp_path / "three.npz", x=np.random.default_rng(0).normal(size=(30, 4)).astype("float32"), y=np.repeat(np.arange(3), 10))
    for name, (scenario, message) in cases.items():
        path = tmp_path / f"{name.replace(' ', '_')}.yaml"
        path.write_text(yaml.safe_dump({**run, "scenario": scenario, "backbone": {"name": "mlp", "scale": 1.0}}))
        assert main(["validate", str(path), "--config-only"]) == 0, name  # the YAML alone is fine ...
        capsys.readouterr()
        assert main(["validate", str(path)]) == 2, name  # ... what it needs is not
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and message in err, (name, err)
    assert not any(p.name == ".clpeft-validate" for p in tmp_path.rglob("*"))  # nothing written
