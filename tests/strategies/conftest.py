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


@pytest.fixture
def interrupted_then_resumed():
    """``check(config, out_dir, at=2)`` -> (accuracy matrix of an uninterrupted run, that of a run
    stopped by an interrupt at ``before_experience`` of experience ``at`` and resumed from its
    checkpoints)."""

    def check(config: dict, out_dir, at: int = 2):
        cfg = clpeft.config.resolve(config)
        full = clpeft.engine.Engine(cfg, out_dir / "full", device="cpu").run()["acc_matrix"]
        engine = clpeft.engine.Engine(cfg, out_dir / "cut", device="cpu")
        stream, strategy = engine._build()
        before = strategy.before_experience

        def stop(exp):
            if exp.index == at:
                raise KeyboardInterrupt
            before(exp)

        strategy.before_experience = stop
        engine._build = lambda: (stream, strategy)
        with pytest.raises(KeyboardInterrupt):
            engine.run()
        resumed = clpeft.engine.Engine(cfg, out_dir / "cut", device="cpu", resume=True).run()["acc_matrix"]
        return full, resumed

    return check
