"""One pass over an online stream, with anytime evaluation between optimizer steps.

The stream is learned in training units (its experiences, or task-free chunks) planned by
:func:`clpeft.online.plan_online`; the anytime accuracy is measured at the plan's evaluation
points, also strictly inside a unit (training pauses there), and each experience's
accuracy-matrix row at its end. ``metrics.json`` adds :func:`clpeft.metrics.anytime_summary`
(A_auc, Koh et al. 2022). ``--resume`` continues after the last finished unit.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import numpy as np

from clpeft import metrics
from clpeft.errors import UserError
from clpeft.experience import Experience
from clpeft.logging import RunLogger
from clpeft.online import OnlinePlan, plan_online
from clpeft.run import Run, peak_memory_mb
from clpeft.seeding import derive_seed, seed_everything

if TYPE_CHECKING:
    from clpeft.engine import Engine

# What a checkpoint of this loop must hold to be resumed from (one missing a key is skipped).
CHECKPOINT_KEYS = ("experience", "strategy", "rows", "curve", "timing", "baseline")


def run_online(engine: Engine, run: Run, log: RunLogger) -> dict:
    """Run (or resume) ``run``'s online stream unit by unit; returns ``metrics.json``'s content."""
    protocol, strategy = run.scenario.online, run.strategy
    plan = plan_online(run.stream, protocol, engine.cfg.train.batch_size)
    rows, curve, timing, baseline, start = [], [], [], None, 0
    if engine.resume:
        found = engine.load_latest(engine.out_dir / "checkpoints", log, CHECKPOINT_KEYS)
        if found is not None:
            path, state = found
            if state["experience"] >= len(plan.units):
                raise UserError(f"{path} was taken after training unit {state['experience']}; this online stream has {len(plan.units)}")
            run.load_strategy(state["strategy"], source=path)
            rows, curve, timing, baseline = state["rows"], state["curve"], state["timing"], state["baseline"]
            start = state["experience"] + 1
            log.event("resumed", checkpoint=path.name, next_experience=start)
            log.print(f"resumed from {path.name}: continuing at training unit {start}/{len(plan.units)}")
        engine.accept_forced_config(log)
    log.event(
        "run_start",
        experiences=len(run.stream),
        units=len(plan.units),
        stream_samples=plan.n_samples,
        device=str(engine.device),
        strategy=engine.cfg.strategy.name,
        parameters=strategy.count_parameters(),
    )
    cache_mark = run.cache_seconds()  # the baseline's feature-cache fill counts with the first unit's
    if start == 0 and engine.cfg.eval.baseline:
        baseline = run.baseline()
        log.event("baseline", accuracy=baseline)
    for unit, (a, b) in zip(plan.units[start:], plan.spans[start:]):
        seed_everything(derive_seed(engine.cfg.seed, unit.index))
        pending = plan.points_in(a, b)
        eval_s = 0.0

        # (the two closures read this iteration's variables, and run only within it)
        def evaluate_until(position: int) -> None:
            nonlocal eval_s
            t, cached = time.perf_counter(), run.cache_seconds()
            while pending and pending[0] <= position:  # noqa: B023
                _evaluation_point(run, plan, pending.pop(0), unit, rows, curve, log)  # noqa: B023
            eval_s += time.perf_counter() - t - (run.cache_seconds() - cached)

        def after_step(trained: int) -> None:  # points strictly inside the unit, between two steps
            position = min(a + (b - a) * trained // n_view, b - 1)  # noqa: B023
            if pending and pending[0] <= position:  # noqa: B023
                with run.training_paused():
                    evaluate_until(position)

        t0, before = time.perf_counter(), run.cache_seconds()
        data = run.prepare(unit)
        n_view = max(len(data), 1)  # after_step's position: the pass over data, mapped onto [a, b)
        run.fit(unit, data, log, after_step=after_step, warn_few_steps=False)
        run.conclude(unit)
        train_s = time.perf_counter() - t0 - eval_s - (run.cache_seconds() - before)
        evaluate_until(b)
        timing.append(
            {
                "experience": unit.index,
                "stream_samples": b - a,
                "train_s": train_s,
                "eval_s": eval_s,
                "cache_s": run.cache_seconds() - cache_mark,
                "train_samples_per_s": (b - a) / train_s if train_s > 0 else None,
                "peak_memory_mb": peak_memory_mb(engine.device),
            }
        )
        cache_mark = run.cache_seconds()
        if engine.world.is_main:
            engine.save_checkpoint(
                engine.out_dir / "checkpoints",
                unit.index,
                {
                    "experience": unit.index,
                    "strategy": strategy.state_dict(),
                    "rows": rows,
                    "curve": curve,
                    "timing": timing,
                    "baseline": baseline,
                },
            )
    online = metrics.anytime_summary(curve, plan.n_samples, sum(t["train_s"] for t in timing))
    log.print(
        f"online: A_auc = {online['a_auc'] if online['a_auc'] is None else round(online['a_auc'], 4)} over "
        f"{len(curve)} evaluation points, {plan.n_samples} stream samples"
    )
    return engine.finish(run, rows, timing, baseline, log, extra_metrics=online)


def _evaluation_point(run: Run, plan: OnlinePlan, position: int, unit: Experience, rows: list, curve: list, log: RunLogger) -> None:
    """Evaluate at stream ``position``: the anytime accuracy and/or, at an experience's end, its matrix row."""
    if position in plan.eval_points:
        accuracy = run.accuracy(plan.seen_test(position))
        curve.append([position, accuracy])
        log.event("anytime", step=position, samples=position, accuracy=accuracy)
    if position in plan.task_ends:
        exp = run.stream[plan.task_ends.index(position)]
        facing = not run.scenario.online.task_free  # the strategy knows of this evaluation
        if facing:
            run.strategy.before_evaluation(unit)
        row = run.evaluate()
        if facing:
            run.strategy.after_evaluation(unit, row)
        rows.append(row)
        seen = float(np.average(row[: exp.index + 1], weights=[len(e.test) for e in run.stream[: exp.index + 1]]))
        log.event(
            "experience_end",
            step=exp.index,
            acc_seen=seen,
            row=row,
            samples=position,
            **{f"acc_exp{j}": acc for j, acc in enumerate(row)},
        )
        log.print(
            f"experience {exp.index + 1}/{len(run.stream)} (after {position} stream samples): acc on seen = "
            f"{seen:.4f}  row = [{', '.join(f'{acc:.3f}' for acc in row)}]"
        )
