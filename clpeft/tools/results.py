"""Reading what runs wrote: a run directory's ``metrics.json`` (one per seed) and ``config.yaml``.

A run directory is a single run (``metrics.json``) or a multi-seed directory
(``seed_<n>/metrics.json`` and ``seeds_summary.json``, see :mod:`clpeft.tools.seed_summary`).
:data:`METRIC_NOTES` says what each scalar metric of ``metrics.json`` measures (the formulas of
:mod:`clpeft.metrics`, with their papers), for the tables that print them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from clpeft.config import read_text, read_yaml
from clpeft.errors import UserError
from clpeft.tools.seed_summary import SUMMARY_FILE, seed_dir, summarize_runs

METRIC_NOTES = {
    "acc_final": "mean_j R[T-1, j] (GEM ACC)",
    "acc_last": "accuracy on all seen test data after the last experience",
    "acc_avg_incremental": "mean over steps of acc on seen data (iCaRL)",
    "bwt": "1/(T-1) sum_j<T-1 R[T-1,j] - R[j,j] (GEM)",
    "forgetting": "1/(T-1) sum_j<T-1 max_l<T-1 R[l,j] - R[T-1,j] (Chaudhry 2018)",
    "fwt": "1/(T-1) sum_j>=1 R[j-1,j] - b_j (GEM)",
    "error_mean": "mean over domains of the test-time-adaptation error",
}


@dataclass
class RunResult:
    """One run directory: the ``metrics.json`` of each of its seeds, and its config."""

    path: Path
    runs: dict[int | None, dict]
    config: dict = field(default_factory=dict)

    @property
    def label(self) -> str:
        return self.path.resolve().name

    @property
    def method(self) -> str:
        return str((self.config.get("strategy") or {}).get("name", "?"))

    @property
    def seeds(self) -> list:
        return list(self.runs)

    def accuracy_matrices(self) -> np.ndarray:
        """Every seed's ``R[i, j]``, shape ``(seeds, rows, experiences)``."""
        return np.asarray([run["acc_matrix"] for run in self.runs.values()], dtype=float)

    def summary(self) -> dict:
        """Mean/std over seeds (:func:`clpeft.tools.seed_summary.summarize_runs`)."""
        return summarize_runs({i: r for i, r in enumerate(self.runs.values())})


def load_result(run_dir: str | Path) -> RunResult:
    """A single-run or multi-seed directory.

    Raises:
        UserError: neither ``metrics.json`` nor finished ``seed_<n>/`` runs are there.
    """
    path = Path(run_dir)
    config = read_yaml(path / "config.yaml") if (path / "config.yaml").is_file() else {}
    if (path / "metrics.json").is_file():
        return RunResult(path, {config.get("seed"): read_results_file(path / "metrics.json")}, config)
    summary = path / SUMMARY_FILE
    if summary.is_file():
        seeds = read_results_file(summary, "seeds")["seeds"]
    else:
        seeds = sorted(int(p.name[5:]) for p in path.glob("seed_*") if p.name[5:].isdigit() and (p / "metrics.json").is_file())
    if not seeds:
        raise UserError(f"{path}: no metrics.json and no finished seed_<n>/ runs (is it a finished run directory?)")
    return RunResult(path, {s: read_results_file(seed_dir(path, s) / "metrics.json") for s in seeds}, config)


def read_results_file(path: Path, *required: str) -> dict:
    """A results file of a run: a JSON object holding ``required`` (default: a metrics.json's keys).

    Raises:
        UserError: the file is missing, not JSON, or lacks a required key.
    """
    if not path.is_file():
        raise UserError(f"{path} is missing (did that seed finish?)")
    required = required or ("acc_matrix", "metrics")
    try:
        data = json.loads(read_text(path, "a clpeft results file"))
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg}); "
                        f"re-run or --resume the run that wrote it") from None
    missing = [key for key in required if not isinstance(data, dict) or key not in data]
    if missing:
        raise UserError(f"{path}: not a clpeft results file (no {', '.join(missing)})")
    return data
