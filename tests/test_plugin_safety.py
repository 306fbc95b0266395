"""Plug-in loading executes only code the user named.

* ``file.py:Class`` runs that one file: not its siblings, not an ``__init__.py`` or
  ``conftest.py`` beside it, and its directory does not join ``sys.path``;
* ``module:Class`` does not import from the current directory that ``python -m`` / ``-c``
  put on ``sys.path`` by themselves, only from ``sys.path`` as the user set it (PYTHONPATH);
* an installed entry point is imported only when its name is asked for.

Every probe module here writes a marker file when it is executed, so "not executed" is checked
on disk, not inferred.
"""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys
import types

import pytest
import yaml

from clpeft import registry
from clpeft.errors import UserError

STRATEGY = "from clpeft import Strategy\nclass {name}(Strategy):\n    '''A probe.'''\n"


def _probe(path, marker, body=""):
    """A Python file that records its own execution in ``marker``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n{body}")
    return path


def _fresh() -> registry.Registry:
    return registry.Registry("strategy", "clpeft.strategies", "clpeft.no_group", "clpeft.strategy:Strategy")


# --------------------------------------------------------------------------- file.py:Class


def test_file_plugin_executes_only_the_named_file(tmp_path, monkeypatch):
    d = tmp_path / "plugins"
    markers = {n: tmp_path / f"{n}.ran" for n in ("plug", "sibling", "init", "conftest", "main", "pkgmod")}
    _probe(d / "plug.py", markers["plug"], STRATEGY.format(name="Mine"))
    _probe(d / "sibling.py", markers["sibling"], STRATEGY.format(name="Mine"))
    _probe(d / "__init__.py", markers["init"])
    _probe(d / "conftest.py", markers["conftest"])
    _probe(d / "__main__.py", markers["main"])
    _probe(d / "pkg" / "mod.py", markers["pkgmod"])
    monkeypatch.chdir(tmp_path)
    path_before = list(sys.path)
    modules_before = set(sys.modules)

    cls = _fresh().get("plugins/plug.py:Mine")

    assert cls.__name__ == "Mine"
    assert {n for n, m in markers.items() if m.exists()} == {"plug"}
    assert sys.path == path_before  # the plug-in's directory was not added
    new = set(sys.modules) - modules_before
    assert "plug" not in new and "sibling" not in new and not any(m.startswith("plugins") for m in new)


def test_file_plugin_importing_a_sibling_fails_cleanly_without_running_it(tmp_path):
    d = tmp_path / "plugins"
    _probe(d / "helper_zz91.py", tmp_path / "helper.ran")
    (d / "uses_helper.py").write_text("import helper_zz91\n" + STRATEGY.format(name="Mine"))
    with pytest.raises(
        UserError,
        match=r"strategy.name: plug-in file .*uses_helper.py: No module named 'helper_zz91'; "
        r"only the named file is executed",
    ):
        _fresh().get(f"{d / 'uses_helper.py'}:Mine")
    assert not (tmp_path / "helper.ran").exists()
    assert not any(
        name.startswith("clpeft_plugin_") and getattr(m, "__file__", "") == str(d / "uses_helper.py")
        for name, m in list(sys.modules.items())
    )  # no half-initialised module is left behind


def test_file_plugin_with_a_syntax_error_names_file_and_line(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("x = 1\ndef broken(:\n")
    with pytest.raises(UserError, match=rf"strategy.name: plug-in file {bad}:2: syntax error"):
        _fresh().get(f"{bad}:Thing")


def test_a_plugin_class_of_the_wrong_kind_is_refused(tmp_path):
    (tmp_path / "notastrategy.py").write_text("class Thing:\n    pass\n")
    with pytest.raises(UserError, match=r"notastrategy.py:Thing is not a strategy: Thing must subclass clpeft.strategy.Strategy"):
        _fresh().get(f"{tmp_path / 'notastrategy.py'}:Thing")


# --------------------------------------------------------------------------- module:Class


@pytest.fixture
def module_in_cwd(tmp_path, monkeypatch):
    """A directory holding ``cwd_probe_mod_q7.py`` (a strategy that records its import); it is the cwd."""
    marker = tmp_path / "cwd_module.ran"
    _probe(tmp_path / "cwd_probe_mod_q7.py", marker, STRATEGY.format(name="Mine"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.delitem(sys.modules, "cwd_probe_mod_q7", raising=False)
    return marker


def test_module_plugin_ignores_the_empty_path_entry_of_python_c(module_in_cwd, monkeypatch):
    monkeypatch.setattr(sys, "path", ["", *sys.path])  # what `python -c` / the REPL put first
    before = list(sys.path)
    with pytest.raises(
        UserError,
        match=r"cannot import module 'cwd_probe_mod_q7' .*not in the current directory; "
        r"or name a file: cwd_probe_mod_q7.py:Class",
    ):
        _fresh().get("cwd_probe_mod_q7:Mine")
    assert not module_in_cwd.exists()
    assert sys.path == before  # restored exactly


def test_module_plugin_ignores_the_start_directory_of_python_m(module_in_cwd, monkeypatch, tmp_path):
    monkeypatch.setattr(registry, "_START_DIR", str(tmp_path))
    monkeypatch.setattr(sys, "path", [str(tmp_path), *sys.path])  # what `python -m` put first
    monkeypatch.setitem(sys.modules, "__main__", types.SimpleNamespace(__spec__=object()))
    monkeypatch.delenv("PYTHONPATH", raising=False)
    with pytest.raises(UserError, match="cannot import module 'cwd_probe_mod_q7'"):
        _fresh().get("cwd_probe_mod_q7:Mine")
    assert not module_in_cwd.exists()

    # the same directory named by the user in PYTHONPATH is the user's choice
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    assert _fresh().get("cwd_probe_mod_q7:Mine").__name__ == "Mine"
    assert module_in_cwd.exists()


def test_module_plugin_on_a_path_the_user_added_is_found(module_in_cwd, monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(tmp_path))  # added by the user's own code, not by the interpreter
    assert _fresh().get("cwd_probe_mod_q7:Mine").__name__ == "Mine"
    assert module_in_cwd.exists()


def test_python_m_clpeft_does_not_import_a_module_from_the_current_directory(tmp_path, digits_run):
    marker = tmp_path / "sneaky.ran"
    _probe(tmp_path / "sneaky_mod_k3.py", marker, STRATEGY.format(name="Mine"))
    digits_run["strategy"] = {"name": "sneaky_mod_k3:Mine"}
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(digits_run))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = subprocess.run(
        [sys.executable, "-m", "clpeft", "validate", "run.yaml"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("clpeft: error: strategy.name: cannot import module 'sneaky_mod_k3'")
    assert not marker.exists()


# --------------------------------------------------------------------------- entry points


@pytest.fixture
def installed(tmp_path, monkeypatch):
    """Three entry points in group ``clpeft.test_safety``: two strategies and one broken."""
    pkg = tmp_path / "site" / "ep_pkg_w4"
    _probe(pkg / "__init__.py", tmp_path / "pkg.ran")
    _probe(pkg / "alpha.py", tmp_path / "alpha.ran", STRATEGY.format(name="Alpha"))
    _probe(pkg / "beta.py", tmp_path / "beta.ran", STRATEGY.format(name="Beta"))
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    for name in ("ep_pkg_w4", "ep_pkg_w4.alpha", "ep_pkg_w4.beta"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    group = "clpeft.test_safety"
    eps = [
        importlib.metadata.EntryPoint("alpha_ep", "ep_pkg_w4.alpha:Alpha", group),
        importlib.metadata.EntryPoint("beta_ep", "ep_pkg_w4.beta:Beta", group),
        importlib.metadata.EntryPoint("broken_ep", "ep_pkg_w4.missing:Gone", group),
    ]
    real = importlib.metadata.entry_points
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda group=None: eps if group == "clpeft.test_safety" else real(group=group))
    reg = registry.Registry("strategy", "clpeft.strategies", group, "clpeft.strategy:Strategy")
    return reg, {n: tmp_path / f"{n}.ran" for n in ("pkg", "alpha", "beta")}


def test_entry_points_load_only_when_their_name_is_asked_for(installed):
    reg, ran = installed
    assert reg.names() == ["alpha_ep", "beta_ep", "broken_ep"]
    assert not any(m.exists() for m in ran.values())  # listing the names imports nothing
    assert reg.get("alpha_ep").__name__ == "Alpha"
    assert ran["alpha"].exists() and not ran["beta"].exists()
    assert reg.get("alpha_ep") is reg.get("alpha_ep")
    with pytest.raises(UserError, match=r"strategy.name: strategy 'broken_ep' \(entry point ep_pkg_w4.missing:Gone\) cannot be loaded"):
        reg.get("broken_ep")
    assert not ran["beta"].exists()


def test_a_misspelt_name_suggests_entry_points_without_loading_them(installed):
    reg, ran = installed
    with pytest.raises(UserError, match="unknown strategy 'beta_e'; did you mean 'beta_ep'"):
        reg.get("beta_e")
    assert not ran["beta"].exists()
