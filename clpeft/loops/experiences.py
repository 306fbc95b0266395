"""Experience by experience: train, evaluate every test set, checkpoint (the engine's default loop).

For a stream of ``T`` experiences: the untrained model is evaluated on every test set (the FWT
baseline ``b``); then for each experience ``i`` the run is re-seeded from ``(seed, i)``, trained
(:meth:`clpeft.run.Run.train_experience`: ``before_experience``, ``train.epochs`` epochs of
``training_step``, ``after_experience``), evaluated on **every** experience's test set (row
``R[i, :]``, future experiences included) and checkpointed. Re-seeding per experience makes
``--resume`` exact. The last evaluation also counts ``final_confusion[true][predicted]``, unless
the strategy scores its own outputs (generated text: :meth:`clpeft.run.Run.correct`).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import numpy as np
import torch

from clpeft import distributed
from clpeft.errors import UserError
from clpeft.logging import RunLogger
from clpeft.run import Run, peak_memory_mb
from clpeft.seeding import derive_seed, seed_everything

if TYPE_CHECKING:
    from clpeft.engine import Engine

# What a checkpoint of this loop must hold to be resumed from (one missing a key is skipped).
CHECKPOINT_KEYS = ("experience", "strategy", "rows", "timing", "baseline")


def run_experiences(engine: Engine, run: Run, log: RunLogger) -> dict:
    """Run (or resume) ``run``'s stream experience by experience; returns ``metrics.json``'s content."""
    stream, strategy = run.stream, run.strategy
    T = len(stream)
    rows: list[list[float]] = []
    timing: list[dict] = []
    baseline = None
    start = 0
    if engine.resume:
        found = engine.load_latest(engine.out_dir / "checkpoints", log, CHECKPOINT_KEYS)
        if found is not None:
            path, state = found
            if state["experience"] >= T or len(state["rows"]) != state["experience"] + 1:
                raise UserError(
                    f"{path} was taken after experience {state['experience']} of a stream with "
                    f"{len(state['rows'][-1]) if state['rows'] else '?'} experiences; this one has {T}"
                )
            run.load_strategy(state["strategy"], source=path)
            rows, timing, baseline = state["rows"], state["timing"], state["baseline"]
            start = state["experience"] + 1
            log.event("resumed", checkpoint=path.name, next_experience=start)
            log.print(f"resumed from {path.name}: continuing at experience {start}/{T}")
        engine.accept_forced_config(log)
    log.event(
        "run_start", experiences=T, device=str(engine.device), strategy=engine.cfg.strategy.name, parameters=strategy.count_parameters()
    )
    cache_mark = run.cache_seconds()  # the baseline's feature-cache fill counts with experience 0's
    if start == 0 and engine.cfg.eval.baseline:
        baseline = run.baseline()
        log.event("baseline", accuracy=baseline)
    confusion = None
    for exp in stream[start:]:
        seed_everything(derive_seed(engine.cfg.seed, exp.index))
        before = run.cache_seconds()
        train_s, n_samples = run.train_experience(exp, log)
        train_s -= run.cache_seconds() - before
        t0, before = time.perf_counter(), run.cache_seconds()
        if exp.index == T - 1 and not run.scores_itself:  # the last evaluation also counts (true, predicted) class pairs
            confusion = torch.zeros(run.n_classes, run.n_classes, dtype=torch.float64)
        strategy.before_evaluation(exp)
        row = run.evaluate(confusion=confusion)
        strategy.after_evaluation(exp, row)
        eval_s = time.perf_counter() - t0 - (run.cache_seconds() - before)
        rows.append(row)
        timing.append(
            {
                "experience": exp.index,
                "train_s": train_s,
                "eval_s": eval_s,
                "cache_s": run.cache_seconds() - cache_mark,
                "train_samples_per_s": n_samples / train_s if train_s > 0 else None,
                "peak_memory_mb": peak_memory_mb(engine.device),
            }
        )
        cache_mark = run.cache_seconds()
        seen = float(np.average(row[: exp.index + 1], weights=[len(e.test) for e in stream[: exp.index + 1]]))
        log.event("experience_end", step=exp.index, acc_seen=seen, row=row, **{f"acc_exp{j}": a for j, a in enumerate(row)})
        log.print(f"experience {exp.index + 1}/{T}: acc on seen = {seen:.4f}  row = [{', '.join(f'{a:.3f}' for a in row)}]")
        distributed.check_consistent(engine.world, strategy, f"experience {exp.index}")
        if engine.world.is_main:
            engine.exports.after_experience(exp.index)  # before the checkpoint: a run resumed after it has this export
            engine.save_checkpoint(
                engine.out_dir / "checkpoints",
                exp.index,
                {"experience": exp.index, "strategy": strategy.state_dict(), "rows": rows, "timing": timing, "baseline": baseline},
            )
    return engine.finish(run, rows, timing, baseline, log, confusion=confusion)
