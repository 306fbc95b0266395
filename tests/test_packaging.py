"""The package layout DESIGN.md promises: scenarios/ and strategies/ install as clpeft.*."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_directory_is_listed_in_pyproject():
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(cfg["packages"])
    mapping = {v: k for k, v in cfg["package-dir"].items()}
    found = set()
    for init in ROOT.glob("**/__init__.py"):
        rel = init.parent.relative_to(ROOT)
        if rel.parts[0] in ("tests", "benchmarks", "build") or any(p.startswith(".") for p in rel.parts):
            continue
        top = mapping.get(rel.parts[0])
        if top is None:
            continue
        found.add(".".join([top, *rel.parts[1:]]))
    assert found == listed


def test_python_dash_m_and_installed_subpackages():
    proc = subprocess.run(
        [sys.executable, "-c", "import clpeft.scenarios.class_incremental, clpeft.strategies.replay, clpeft.cli; print('ok')"],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.stdout.strip() == "ok", proc.stderr
    proc = subprocess.run([sys.executable, "-m", "clpeft", "list"], capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0 and "replay" in proc.stdout and "efficientnet-lite0" in proc.stdout


def test_top_level_names_load_on_first_use_and_merging_skips_the_training_stack():
    code = (
        "import sys, clpeft.merging\n"
        "print(sorted(m for m in ('timm', 'torchvision', 'clpeft.strategy') if m in sys.modules))\n"
        "from clpeft import Strategy, UserError, register_strategy\n"
        "from clpeft.errors import UserError as direct\n"
        "print(Strategy.__module__, UserError is direct, callable(register_strategy), 'timm' in sys.modules)\n"
        "import clpeft\n"
        "print(set(clpeft.__all__) <= set(dir(clpeft)))\n"
        "try:\n    clpeft.Stratgy\nexcept AttributeError as e:\n    print(e)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.stdout.splitlines() == [
        "[]",
        "clpeft.strategy True True True",
        "True",
        "module 'clpeft' has no attribute 'Stratgy'",
    ], proc.stderr
