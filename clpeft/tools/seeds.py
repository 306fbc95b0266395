"""Several seeds of one config in one directory, and their mean and standard deviation.

``clpeft run CONFIG --seeds 0,1,2`` (or ``seeds: [0, 1, 2]`` in the YAML) writes::

    OUT/config.yaml            the config as given (with its ``seeds``)
    OUT/seed_0/ ... seed_2/    one ordinary run directory per seed (resumable on its own)
    OUT/seeds_summary.json     mean and std over seeds of every metric

The summary's statistics (sample standard deviation, elementwise means of list metrics) are
:mod:`clpeft.tools.seed_summary`'s.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import yaml

from clpeft import distributed
from clpeft.config import RunConfig
from clpeft.errors import UserError
from clpeft.run_directory import RunLock, run_files, write_atomic
from clpeft.tools.results import read_results_file
from clpeft.tools.seed_summary import SUMMARY_FILE, seed_dir, summarize_runs


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
            results[seed] = read_results_file(run_dir / "metrics.json")
        else:
            single = dataclasses.replace(cfg, seed=seed, seeds=None, out=None)
            started = resume and (run_dir / "config.yaml").is_file()
            results[seed] = Engine(single, run_dir, resume=started, **engine_kwargs).run()
        if on_done is not None:
            on_done(seed, results[seed])
    summary = summarize_runs(results)
    if world.is_main:
        write_atomic(out / SUMMARY_FILE, json.dumps(summary, indent=2))
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
