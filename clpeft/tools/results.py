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
from clpeft.metrics import few_shot_summary
from clpeft.tools.breakdowns import FEW_SHOT, TTA, adaptation, scenario_kind
from clpeft.tools.seed_summary import SUMMARY_FILE, seed_dir, summarize_runs

METRIC_NOTES = {
    "acc_final": "mean_j R[T-1, j] (GEM ACC)",
    "acc_last": "accuracy on all seen test data after the last experience",
    "acc_avg_incremental": "mean over steps of acc on seen data (iCaRL)",
    "bwt": "1/(T-1) sum_j<T-1 R[T-1,j] - R[j,j] (GEM)",
    "forgetting": "1/(T-1) sum_j<T-1 max_l<T-1 R[l,j] - R[T-1,j] (Chaudhry 2018)",
    "fwt": "1/(T-1) sum_j>=1 R[j-1,j] - b_j (GEM)",
    "error_mean": "mean over domains of the test-time-adaptation error",
    "a_auc": "area under the anytime-accuracy curve / samples (Koh 2022, online streams)",
    "acc_anytime_last": "anytime accuracy at the last evaluation point (online streams)",
    "samples_per_s": "stream samples trained per second, evaluation excluded (online streams)",
    "session_acc_mean": "mean over sessions of the accuracy on all seen classes (Tao 2020)",
    "base_acc_last": "R[T-1, 0]: accuracy on the base session's classes after the last session",
    "novel_acc_last": "sum_1<=j n_j R[T-1,j] / sum n_j: accuracy on the classes added after session 0",
    "harmonic_mean_last": "2 b n / (b + n) of base and novel accuracy (Peng 2022, ALICE)",
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

    @property
    def kind(self) -> str:
        """The scenario kind as :func:`clpeft.tools.breakdowns.scenario_kind` reads it."""
        return scenario_kind(next(iter(self.runs.values())), self.config)

    @property
    def setting(self) -> str:
        """The method as a reader names it: the strategy, plus ``continual``/``reset`` for test-time adaptation."""
        return f"{self.method} ({adaptation(self.config)})" if self.kind == TTA else self.method

    @property
    def legend(self) -> str:
        """The setting and its seeds, e.g. ``replay, seed 0`` or ``tent (reset), seeds 0,1``."""
        seeds = [s for s in self.runs if s is not None]
        if not seeds:
            return self.setting
        return f"{self.setting}, seed{'s' if len(seeds) > 1 else ''} {','.join(map(str, seeds))}"

    def accuracy_matrices(self) -> np.ndarray:
        """Every seed's ``R[i, j]``, shape ``(seeds, rows, experiences)``."""
        return np.asarray([run["acc_matrix"] for run in self.runs.values()], dtype=float)

    def final_confusion(self) -> np.ndarray | None:
        """The ``final_confusion`` counts summed over the seeds (None when a seed's file lacks them)."""
        runs = list(self.runs.values())
        if not all("final_confusion" in run for run in runs):
            return None
        return np.sum([np.asarray(run["final_confusion"], dtype=np.int64) for run in runs], axis=0)

    def summary(self) -> dict:
        """Mean/std over seeds (:func:`clpeft.tools.seed_summary.summarize_runs`)."""
        return summarize_runs({i: r for i, r in enumerate(self.runs.values())})


def legends(results: list[RunResult]) -> list[str]:
    """Each result's :attr:`RunResult.legend`; those that two results share get their directory added."""
    names = [r.legend for r in results]
    return [f"{n} [{r.label}]" if names.count(n) > 1 else n for n, r in zip(names, results)]


def load_result(run_dir: str | Path) -> RunResult:
    """A single-run or multi-seed directory.

    Raises:
        UserError: neither ``metrics.json`` nor finished ``seed_<n>/`` runs are there.
    """
    path = Path(run_dir)
    config = read_yaml(path / "config.yaml") if (path / "config.yaml").is_file() else {}
    if (path / "metrics.json").is_file():
        return RunResult(path, {config.get("seed"): _derived(read_results_file(path / "metrics.json"), config)}, config)
    summary = path / SUMMARY_FILE
    if summary.is_file():
        seeds = read_results_file(summary, "seeds")["seeds"]
    else:
        seeds = sorted(int(p.name[5:]) for p in path.glob("seed_*") if p.name[5:].isdigit() and (p / "metrics.json").is_file())
    if not seeds:
        raise UserError(f"{path}: no metrics.json and no finished seed_<n>/ runs (is it a finished run directory?)")
    return RunResult(path, {s: _derived(read_results_file(seed_dir(path, s) / "metrics.json"), config) for s in seeds}, config)


def _derived(run: dict, config: dict) -> dict:
    """``run`` with the few-shot session metrics filled in from its matrix when its file predates them."""
    if scenario_kind(run, config) == FEW_SHOT and "harmonic_mean" not in run["metrics"]:
        run["metrics"].update(few_shot_summary(run["acc_matrix"], run["test_sizes"]))
    return run


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
        raise UserError(
            f"{path}: not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg}); re-run or --resume the run that wrote it"
        ) from None
    missing = [key for key in required if not isinstance(data, dict) or key not in data]
    if missing:
        raise UserError(f"{path}: not a clpeft results file (no {', '.join(missing)})")
    return data
