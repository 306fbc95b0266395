"""Several seeds of one config in one directory, and their mean and standard deviation.

``clpeft run CONFIG --seeds 0,1,2`` (or ``seeds: [0, 1, 2]`` in the YAML) writes::

    OUT/config.yaml            the config as given (with its ``seeds``)
    OUT/seed_0/ ... seed_2/    one ordinary run directory per seed (resumable on its own)
    OUT/seeds_summary.json     mean and std over seeds of every metric

The standard deviation is the **sample** standard deviation, ``numpy.std(values, ddof=1)``
(:data:`DDOF`), as in most continual-learning papers' "mean ± std over 3 runs"; with a single
seed it is ``null``. List metrics (``acc_seen``, ``error_per_domain``) and the accuracy matrix
are averaged elementwise.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import yaml

from clpeft import distributed
from clpeft.config import RunConfig
from clpeft.errors import UserError
from clpeft.run_directory import RunLock, run_files

DDOF = 1
SUMMARY_FILE = "seeds_summary.json"
TIMING_KEYS = ("train_s", "eval_s", "peak_memory_mb")


def seed_dir(out: str | Path, seed: int) -> Path:
    return Path(out) / f"seed_{seed}"


def mean_std(values) -> dict:
    """``{"mean", "std", "values"}`` of scalars or equal-shape lists (elementwise), ``std`` with :data:`DDOF`."""
    a = np.asarray(values, dtype=np.float64)
    std = a.std(axis=0, ddof=DDOF) if len(a) > DDOF else None
    return {
        "mean": a.mean(axis=0).tolist(),
        "std": None if std is None else std.tolist(),
        "values": a.tolist(),
    }


def summarize_runs(runs: dict[int, dict]) -> dict:
    """The ``seeds_summary.json`` content of ``{seed: metrics.json content}``.

    Metrics present in every run are summarised; list metrics must have equal lengths.
    """
    seeds = sorted(runs)
    results = [runs[s] for s in seeds]
    keys = [k for k in results[0]["metrics"] if all(k in r["metrics"] for r in results)]
    metrics = {}
    for key in keys:
        values = [r["metrics"][key] for r in results]
        if any(v is None for v in values):
            continue
        if isinstance(values[0], list) and len({len(v) for v in values}) > 1:
            raise UserError(f"metric '{key}' has different lengths across seeds {seeds}; the seeds ran different streams")
        metrics[key] = mean_std(values)
    timing = {k: mean_std([r["timing"][k] for r in results]) for k in TIMING_KEYS
              if all(k in r.get("timing", {}) for r in results)}
    out = {
        "seeds": seeds,
        "runs": [seed_dir(".", s).name for s in seeds],
        "ddof": DDOF,
        "std": f"sample standard deviation over seeds, numpy.std(ddof={DDOF})",
        "metrics": metrics,
        "timing": timing,
    }
    shapes = {np.shape(r.get("acc_matrix")) for r in results}
    if len(shapes) == 1 and results[0].get("acc_matrix"):
        out["acc_matrix"] = mean_std([r["acc_matrix"] for r in results])
    if all("parameters" in r for r in results):
        out["parameters"] = results[0]["parameters"]
    if results[0].get("class_names"):
        out["class_names"] = results[0]["class_names"]
    return out


def run_seeds(cfg: RunConfig, out: str | Path, engine_kwargs: dict, *, resume: bool = False, on_done=None) -> dict:
    """Run ``cfg`` once per seed of ``cfg.seeds`` into ``out/seed_<n>/``; writes and returns the summary.

    With ``resume``, finished seeds (a ``metrics.json``) are read back, started ones resumed
    from their checkpoints and the rest run. ``on_done(seed, result)`` is called after each seed.
    """
    out = Path(out)
    world = distributed.current()
    seeds = list(cfg.seeds or [cfg.seed])
    lock = RunLock(out) if world.is_main else None  # the seed runs lock their own directories too
    try:
        if not resume and (run_files(out) or any(seed_dir(out, s).exists() for s in seeds)):
            raise UserError(f"{out} already holds seed runs or a run; pass --resume to continue them or choose another --out")
        world.barrier()  # every rank has checked before rank 0 writes
        if world.is_main:
            (out / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        return _run_each_seed(cfg, out, seeds, engine_kwargs, resume, on_done)
    finally:
        if lock is not None:
            lock.release()


def _run_each_seed(cfg: RunConfig, out: Path, seeds: list[int], engine_kwargs: dict, resume: bool, on_done) -> dict:
    from clpeft.engine import Engine

    world = distributed.current()
    results = {}
    for seed in seeds:
        run_dir = seed_dir(out, seed)
        if resume and (run_dir / "metrics.json").is_file():
            results[seed] = json.loads((run_dir / "metrics.json").read_text())
        else:
            single = dataclasses.replace(cfg, seed=seed, seeds=None, out=None)
            started = resume and (run_dir / "config.yaml").is_file()
            results[seed] = Engine(single, run_dir, resume=started, **engine_kwargs).run()
        if on_done is not None:
            on_done(seed, results[seed])
    summary = summarize_runs(results)
    if world.is_main:
        tmp = out / f".{SUMMARY_FILE}.tmp"
        tmp.write_text(json.dumps(summary, indent=2))
        tmp.replace(out / SUMMARY_FILE)
    return summary


def run_config(cfg: RunConfig, out: str | Path, engine_kwargs: dict, *, resume: bool = False) -> None:
    """One run, or one per seed when ``cfg.seeds`` is set, into ``out``.

    With ``resume`` a finished run is left as it is, a started one resumed and a missing one run.
    """
    from clpeft.engine import Engine

    out = Path(out)
    if cfg.seeds:
        run_seeds(cfg, out, engine_kwargs, resume=resume)
    elif not (resume and (out / "metrics.json").is_file()):
        Engine(cfg, out, resume=resume and (out / "config.yaml").is_file(), **engine_kwargs).run()
