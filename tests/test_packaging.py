"""The package layout DESIGN.md promises: scenarios/ and strategies/ install as clpeft.*."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import tomllib

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
        capture_output=True,
        text=True,
        timeout=120,
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


def test_the_frost_photographs_and_their_licence_are_package_data():
    """frost corrupts on the fly from ImageNet-C's photographs: a wheel must carry them, their
    Apache-2.0 LICENSE and the NOTICE naming hendrycks/robustness (pyproject's package-data)."""
    import fnmatch

    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["clpeft.scenarios"]
    folder = ROOT / "scenarios" / "frost"
    files = sorted(p.relative_to(folder.parent).as_posix() for p in folder.iterdir())
    assert {"frost/LICENSE", "frost/NOTICE"} <= set(files)
    assert all(any(fnmatch.fnmatch(f, pattern) for pattern in patterns) for f in files), files
    notice = (folder / "NOTICE").read_text()
    assert "hendrycks/robustness" in notice and "Apache License 2.0" in notice
    assert "Apache License" in (folder / "LICENSE").read_text()
    from clpeft.scenarios import corruptions

    for name in corruptions.FROST_PHOTOS:
        for scale in (None, "020", "030"):
            assert corruptions.frost_photo(name, scale).ndim == 3


@pytest.mark.slow
def test_a_built_wheel_holds_the_frost_photographs(tmp_path):
    """Built from a copy of the sources (setuptools builds in the source tree)."""
    import shutil
    import zipfile

    source = tmp_path / "src"
    for name in ("clpeft", "scenarios", "strategies"):
        shutil.copytree(ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path)],
        check=True,
        timeout=600,
        cwd=tmp_path,
    )
    (wheel,) = tmp_path.glob("clpeft-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {f"clpeft/scenarios/frost/{p.name}" for p in (ROOT / "scenarios" / "frost").iterdir()}
    assert expected <= names and "clpeft/scenarios/frost/NOTICE" in names
    assert "clpeft/merging/linear_merge.c" in names  # the CPU merge kernel compiles from it on first use


def test_the_fscil_session_lists_and_their_licence_are_package_data():
    """session_lists: cec reads TOPIC/CEC's lists from scenarios/fscil_sessions/: a wheel must carry
    them, CEC's MIT LICENSE and the NOTICE naming icoz69/CEC-CVPR2021 (pyproject's package-data)."""
    import fnmatch

    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["clpeft.scenarios"]
    folder = ROOT / "scenarios" / "fscil_sessions"
    files = sorted(p.relative_to(folder.parent).as_posix() for p in folder.rglob("*") if p.is_file())
    assert {"fscil_sessions/LICENSE", "fscil_sessions/NOTICE", "fscil_sessions/mini_imagenet/train.csv"} <= set(files)
    assert len(files) == 2 + 9 + 11 + 9 + 2  # LICENSE, NOTICE; cifar100, cub200, mini_imagenet sessions; mini's split
    assert all(any(fnmatch.fnmatch(f, pattern) for pattern in patterns) for f in files), files
    notice = (folder / "NOTICE").read_text()
    assert "icoz69/CEC-CVPR2021" in notice and "MIT License" in notice
    assert "MIT License" in (folder / "LICENSE").read_text()


@pytest.mark.slow
def test_a_built_wheel_holds_the_fscil_session_lists(tmp_path):
    import zipfile

    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path)],
        check=True,
        timeout=600,
        cwd=tmp_path,
    )
    (wheel,) = tmp_path.glob("clpeft-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    folder = ROOT / "scenarios" / "fscil_sessions"
    expected = {f"clpeft/scenarios/{p.relative_to(folder.parent).as_posix()}" for p in folder.rglob("*") if p.is_file()}
    assert expected <= names and "clpeft/scenarios/fscil_sessions/NOTICE" in names
