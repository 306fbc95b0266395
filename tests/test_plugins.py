"""Registries and plug-ins: names, module:Class, file.py:Class, entry points, hook checks."""

from __future__ import annotations

import importlib.metadata

import pytest

from clpeft import Strategy, register_strategy, registry
from clpeft.errors import UserError


def test_builtins_are_registered_with_descriptions():
    assert {"finetune", "joint", "replay", "lwf", "ewc"} <= set(registry.strategies.names())
    assert "class_incremental" in registry.scenarios.names()
    assert {"timm", "mlp"} <= set(registry.backbones.names())
    for reg in (registry.strategies, registry.scenarios, registry.backbones):
        for name, cls in reg.items():
            assert registry.describe(cls), f"{reg.kind} '{name}' needs a one-line docstring"


def test_module_colon_class(tmp_path, monkeypatch):
    (tmp_path / "my_pkg_x1").mkdir()
    (tmp_path / "my_pkg_x1" / "__init__.py").write_text("")
    (tmp_path / "my_pkg_x1" / "methods.py").write_text("from clpeft import Strategy\nclass Probe(Strategy):\n    '''A probe.'''\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    cls = registry.strategies.get("my_pkg_x1.methods:Probe")
    assert cls.__name__ == "Probe" and issubclass(cls, Strategy)
    with pytest.raises(UserError, match="'my_pkg_x1.methods' has no class 'Prob'; did you mean 'Probe'"):
        registry.strategies.get("my_pkg_x1.methods:Prob")


def test_file_plugin_is_executed_once_and_relative_to_the_config_dir(tmp_path, monkeypatch):
    plugin = tmp_path / "configs" / "plug.py"
    plugin.parent.mkdir()
    plugin.write_text(
        "import clpeft\nclpeft.LOADS = getattr(clpeft, 'LOADS', 0) + 1\n"
        "from clpeft import Strategy\nclass Mine(Strategy):\n    '''Mine.'''\n"
    )
    monkeypatch.chdir(tmp_path)
    import clpeft

    a = registry.strategies.get("plug.py:Mine", base_dir=plugin.parent)
    b = registry.strategies.get("configs/plug.py:Mine")
    assert a is b and clpeft.LOADS == 1
    del clpeft.LOADS


def test_entry_point_group_registers_installed_methods(monkeypatch):
    reg = registry.Registry("strategy", "clpeft.strategies", "clpeft.test_group")
    ep = importlib.metadata.EntryPoint("third_party", "clpeft.strategies.finetune:Finetune", "clpeft.test_group")
    real = importlib.metadata.entry_points
    monkeypatch.setattr(importlib.metadata, "entry_points", lambda group=None: [ep] if group == "clpeft.test_group" else real(group=group))
    assert reg.get("third_party").__name__ == "Finetune"


def test_duplicate_name_is_an_error():
    with pytest.raises(ValueError, match="'finetune' is already registered"):

        @register_strategy("finetune")
        class Other(Strategy):
            """Another."""


def test_unknown_hook_fails_at_class_creation():
    with pytest.raises(TypeError, match=r"defines \['after_batch'\], which the engine never calls"):

        class Typo(Strategy):
            def after_batch(self, batch): ...


def test_scenario_compatibility_is_checked(tmp_path, digits_run, monkeypatch):
    from clpeft import config
    from clpeft.engine import Engine

    (tmp_path / "tta_only.py").write_text(
        "from clpeft import Strategy\nclass TTAOnly(Strategy):\n    '''Only TTA.'''\n    supported_scenarios = ('test_time_adaptation',)\n"
    )
    monkeypatch.chdir(tmp_path)
    digits_run["strategy"] = {"name": "tta_only.py:TTAOnly"}
    with pytest.raises(
        UserError,
        match="strategy.name: strategy 'tta_only.py:TTAOnly' supports \\['test_time_adaptation'\\] scenarios, not 'class_incremental'",
    ):
        Engine(config.resolve(digits_run), tmp_path / "run", device="cpu").run()
