"""Every shipped config validates, so a user's first `clpeft validate` never fails on ours."""

from __future__ import annotations

from pathlib import Path

import pytest

from clpeft.cli import main

REGISTRY = "published_setups.yaml"  # the list of published setups (tests/test_reproduce.py), not a run config
CONFIGS = sorted(p for p in (Path(__file__).resolve().parents[1] / "configs").rglob("*.yaml") if p.name != REGISTRY)


def test_configs_exist():
    assert len(CONFIGS) >= 4


@pytest.mark.parametrize("path", CONFIGS, ids=[str(p.relative_to(p.parents[1])) for p in CONFIGS])
def test_shipped_config_validates(path, capsys):
    assert main(["validate", str(path)]) == 0, capsys.readouterr().err
