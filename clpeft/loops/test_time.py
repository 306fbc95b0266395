"""Test-time adaptation: a source phase, then online adaptation domain by domain.

1. Source phase (experience 0): the strategy trains on ``scenario.source`` as in
   :func:`~clpeft.loops.run_experiences` (``train.epochs``, ``training_step``), or loads
   ``scenario.source_checkpoint``; the result is saved as ``source/exp_000.pt``.
2. For each domain experience ``1..D``: the source state is restored first when
   ``scenario.reset_each_domain``; ``before_experience(exp)``; the domain's test data is read in
   stream order (no shuffle) in batches of ``train.batch_size`` and every batch goes to
   ``logits = strategy.adapt(x)`` under ``torch.enable_grad()``: **inputs only**. The loop keeps
   the labels and scores each online prediction (:class:`clpeft.run.OnlineScorer`); the
   strategy's hooks see experiences whose ``test`` is None, so labels never reach it. ``adapt``
   runs its own optimizer steps on the parameters it chooses. Then ``after_experience(exp)`` and a
   checkpoint: ``--resume`` continues at the next domain, bitwise.

``metrics.json`` holds ``error_per_domain``, ``error_mean`` and ``error_overall``
(:func:`clpeft.metrics.tta_summary`), ``domains`` (their names), and as ``acc_matrix`` a single
row: the online accuracy on each domain (there is no per-experience re-evaluation).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING

from clpeft import metrics
from clpeft.errors import UserError
from clpeft.experience import Experience
from clpeft.logging import RunLogger
from clpeft.provenance import provenance
from clpeft.run import Run, peak_memory_mb
from clpeft.run_directory import read_source_checkpoint
from clpeft.seeding import derive_seed, seed_everything

if TYPE_CHECKING:
    from clpeft.engine import Engine

# What each kind of checkpoint must hold to be resumed from (one missing a key is skipped).
SOURCE_KEYS = ("experience", "strategy", "timing")
CHECKPOINT_KEYS = ("experience", "strategy", "correct", "counts", "timing")


def run_test_time(engine: Engine, run: Run, log: RunLogger) -> dict:
    """Run (or resume) the source phase and the domains of a test-time-adaptation stream."""
    scenario, stream, strategy = run.scenario, run.stream, run.strategy
    classes = list(range(len(scenario.class_names)))
    source_exp = Experience(0, scenario.source, None, classes, classes, domain="source")
    facing = [source_exp]  # what the strategy's hooks see: no test data, so no labels
    for exp in stream:
        facing.append(dataclasses.replace(exp, test=None, past=tuple(facing)))
    ckpt_dir, source_dir = engine.out_dir / "checkpoints", engine.out_dir / "source"
    log.event(
        "run_start",
        experiences=len(stream),
        device=str(engine.device),
        strategy=engine.cfg.strategy.name,
        parameters=strategy.count_parameters(),
    )
    found = engine.load_latest(ckpt_dir, log, CHECKPOINT_KEYS) if engine.resume else None
    needs_source = found is None or scenario.reset_each_domain
    source = engine.load_latest(source_dir, log, SOURCE_KEYS) if engine.resume and needs_source else None
    if found is not None:
        state = found[1]
        if state["experience"] > len(stream):
            raise UserError(f"{found[0]} was taken after domain {state['experience']}; this stream has {len(stream)}")
        run.load_strategy(state["strategy"], source=found[0])
        correct, counts, timing = state["correct"], state["counts"], state["timing"]
        start = state["experience"] + 1
        log.event("resumed", checkpoint=found[0].name, next_experience=start)
        log.print(f"resumed from {found[0].name}: continuing at domain {start}/{len(stream)}")
    elif source is not None:  # killed after the source phase, before the first domain ended
        run.load_strategy(source[1]["strategy"], source=source[0])
        correct, counts, timing, start = [], [], source[1]["timing"], 1
    else:
        correct, counts, start = [], [], 1
        timing = _source_phase(engine, run, source_exp, log)
        engine.save_checkpoint(source_dir, 0, {"experience": 0, "strategy": strategy.state_dict(), "timing": timing}, keep=1)
    if engine.resume:
        engine.accept_forced_config(log)
    source_state = None
    if scenario.reset_each_domain:  # the saved source state, read once (a copy the adaptation cannot touch)
        source_state = (source or engine.load_latest(source_dir, log, SOURCE_KEYS))[1]["strategy"]
    for exp, scored in zip(facing[start:], stream[start - 1 :]):
        seed_everything(derive_seed(engine.cfg.seed, exp.index))
        if source_state is not None:
            run.load_strategy(source_state)
        scorer, seconds, n_batches = run.adapt_domain(exp, scored.test)
        correct.append(scorer.correct)
        counts.append(scorer.count)
        timing.append(
            {
                "experience": exp.index,
                "domain": exp.domain,
                "adapt_s": seconds,
                "batches": n_batches,
                "samples_per_s": scorer.count / seconds if seconds > 0 else None,
                "peak_memory_mb": peak_memory_mb(engine.device),
            }
        )
        error = 1.0 - scorer.correct / scorer.count
        log.event("domain_end", step=exp.index, domain=exp.domain, error=error, accuracy=1.0 - error)
        log.print(f"domain {exp.index}/{len(stream)} ({exp.domain}): online error = {error:.4f}")
        engine.save_checkpoint(
            ckpt_dir,
            exp.index,
            {"experience": exp.index, "strategy": strategy.state_dict(), "correct": correct, "counts": counts, "timing": timing},
        )
    return _finish(engine, run, correct, counts, timing, log)


def _source_phase(engine: Engine, run: Run, source_exp: Experience, log: RunLogger) -> list[dict]:
    """Train the source model on clean data (experience 0), or load ``source_checkpoint``."""
    path = run.scenario.source_checkpoint
    if path is not None:
        run.load_strategy(read_source_checkpoint(Path(path).expanduser()), partial=True)
        log.event("source_loaded", path=str(path))
        return [{"experience": 0, "domain": "source", "train_s": 0.0, "peak_memory_mb": peak_memory_mb(engine.device)}]
    seed_everything(derive_seed(engine.cfg.seed, 0))
    train_s, n_samples = run.train_experience(source_exp, log)
    log.event("source_trained", step=0, train_s=train_s)
    return [
        {
            "experience": 0,
            "domain": "source",
            "train_s": train_s,
            "train_samples_per_s": n_samples / train_s if train_s > 0 else None,
            "peak_memory_mb": peak_memory_mb(engine.device),
        }
    ]


def _finish(engine: Engine, run: Run, correct: list, counts: list, timing: list[dict], log: RunLogger) -> dict:
    summary = metrics.tta_summary(correct, counts)
    adapt = [t for t in timing if "adapt_s" in t]
    adapt_s = sum(t["adapt_s"] for t in adapt)
    result = {
        "acc_matrix": [[c / n for c, n in zip(correct, counts)]],
        "test_sizes": list(counts),
        "domains": [e.domain for e in run.stream],
        "baseline": None,
        "metrics": summary,
        "timing": {
            "experiences": timing,
            "train_s": timing[0].get("train_s", 0.0),
            "eval_s": adapt_s,
            "s_per_batch": adapt_s / max(sum(t["batches"] for t in adapt), 1),
            "peak_memory_mb": max(t["peak_memory_mb"] for t in timing),
        },
        "parameters": run.strategy.count_parameters(),
        "provenance": provenance(engine.device),
        "class_names": run.scenario.class_names,
    }
    engine.write_result(result, run.strategy, log)
    return result
