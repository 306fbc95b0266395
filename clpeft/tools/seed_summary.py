"""The mean and standard deviation over seeds of a multi-seed run directory.

A multi-seed directory holds ``seed_<n>/`` run directories (:func:`seed_dir`) and
``seeds_summary.json`` (:data:`SUMMARY_FILE`, the content :func:`summarize_runs` returns).
The standard deviation is the **sample** standard deviation, ``numpy.std(values, ddof=1)``
(:data:`DDOF`), as in most continual-learning papers' "mean ± std over 3 runs"; with a single
seed it is ``null``. List metrics (``acc_seen``, ``error_per_domain``) and the accuracy matrix
are averaged elementwise.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from clpeft.errors import UserError

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
    timing = {k: mean_std([r["timing"][k] for r in results]) for k in TIMING_KEYS if all(k in r.get("timing", {}) for r in results)}
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
