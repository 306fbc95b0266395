"""Shared by the strategy tests: run the engine and keep what it built."""

from __future__ import annotations

import pytest

import clpeft.config
import clpeft.engine


@pytest.fixture
def run_keeping():
    """``run(config, out_dir)`` runs the engine on the CPU; returns (metrics.json content, the
    strategy it trained, its stream)."""

    def run(config: dict, out_dir):
        engine = clpeft.engine.Engine(clpeft.config.resolve(config), out_dir, device="cpu")
        result = engine.run()
        return result, engine.built.strategy, engine.built.stream

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
        built = engine.build()
        strategy = built.strategy
        before = strategy.before_experience

        def stop(exp):
            if exp.index == at:
                raise KeyboardInterrupt
            before(exp)

        strategy.before_experience = stop
        with pytest.raises(KeyboardInterrupt):
            engine.run(built)
        resumed = clpeft.engine.Engine(cfg, out_dir / "cut", device="cpu", resume=True).run()["acc_matrix"]
        return full, resumed

    return check
