"""Shared by the strategy tests: run the engine and keep what it built."""

from __future__ import annotations

import pytest

import clpeft.config
import clpeft.engine


@pytest.fixture
def run_keeping(monkeypatch):
    """``run(config, out_dir)`` runs the engine on the CPU; returns (metrics.json content, the
    strategy it trained, its stream)."""

    def run(config: dict, out_dir):
        built = {}
        build = clpeft.engine.Engine._build

        def spy_build(self):
            stream, strategy = build(self)
            built.update(strategy=strategy, stream=stream)
            return stream, strategy

        monkeypatch.setattr(clpeft.engine.Engine, "_build", spy_build)
        try:
            result = clpeft.engine.Engine(clpeft.config.resolve(config), out_dir, device="cpu").run()
        finally:
            monkeypatch.setattr(clpeft.engine.Engine, "_build", build)
        return result, built["strategy"], built["stream"]

    return run
