"""``clpeft compare RUN_DIR ...``: one table of methods x metrics, as Markdown and CSV.

A run directory is a single run (``metrics.json``) or a multi-seed directory
(``seed_<n>/metrics.json``, read by :mod:`clpeft.tools.results`). Each row gives, over the
seeds, the mean ± sample std (``ddof=1``) of every metric, the wall time (train + eval seconds),
the trainable and total parameter counts and the peak memory. Accuracy-type metrics are shown in percent
unless ``percent=False``. Below the table, the definitions of the metrics used (the formulas of
:mod:`clpeft.metrics`, with their papers) are printed, so a pasted table says what it measures.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

from clpeft.tools.results import METRIC_NOTES, RunResult, load_result
from clpeft.tools.seed_summary import DDOF, mean_std

#: Scalar metrics in table order; a column appears when some run has it.
METRIC_COLUMNS = ("acc_final", "acc_last", "acc_avg_incremental", "bwt", "forgetting", "fwt", "error_mean")
PERCENT_METRICS = set(METRIC_COLUMNS)
REFERENCES = (
    "Lopez-Paz & Ranzato, Gradient Episodic Memory, NeurIPS 2017 (ACC, BWT, FWT)",
    "Chaudhry et al., Riemannian Walk, ECCV 2018 (forgetting)",
    "Rebuffi et al., iCaRL, CVPR 2017 (average incremental accuracy)",
)


def comparison_rows(results: list[RunResult], percent: bool = True) -> tuple[list[str], list[dict]]:
    """Columns (metric keys) and one row per run: ``{key: (mean, std or None)}`` plus labels."""
    summaries = [r.summary() for r in results]
    metrics = [m for m in METRIC_COLUMNS if any(m in s["metrics"] for s in summaries)]
    rows = []
    for result, summary in zip(results, summaries):
        row: dict = {"run": result.label, "method": result.method, "seeds": len(result.runs)}
        for m in metrics:
            stat = summary["metrics"].get(m)
            scale = 100.0 if percent and m in PERCENT_METRICS else 1.0
            row[m] = None if stat is None else (stat["mean"] * scale, None if stat["std"] is None else stat["std"] * scale)
        walls = [r["timing"]["train_s"] + r["timing"]["eval_s"] for r in result.runs.values()]
        row["wall_s"] = _stat(walls)
        row["peak_memory_mb"] = _stat([r["timing"].get("peak_memory_mb", float("nan")) for r in result.runs.values()])
        params = next(iter(result.runs.values())).get("parameters") or {}
        row["trainable_params"] = params.get("trainable")
        row["total_params"] = params.get("total")
        rows.append(row)
    return metrics, rows


def _stat(values: list[float]) -> tuple[float, float | None]:
    s = mean_std(values)
    return s["mean"], s["std"]


def _fmt(stat, digits: int) -> str:
    if stat is None:
        return "–"
    mean, std = stat
    return f"{mean:.{digits}f}" if std is None else f"{mean:.{digits}f} ± {std:.{digits}f}"


def _count(n) -> str:
    if n is None:
        return "–"
    return f"{n / 1e6:.2f}M" if n >= 1e6 else (f"{n / 1e3:.1f}k" if n >= 1e3 else str(n))


def to_markdown(metrics: list[str], rows: list[dict], percent: bool = True) -> str:
    unit = " (%)" if percent else ""
    header = ["run", "method", "seeds", *[f"{m}{unit}" for m in metrics], "wall time (s)", "trainable params", "peak memory (MB)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    digits = 2 if percent else 4
    for row in rows:
        cells = [row["run"], row["method"], str(row["seeds"]), *[_fmt(row[m], digits) for m in metrics],
                 _fmt(row["wall_s"], 1), _count(row["trainable_params"]), _fmt(row["peak_memory_mb"], 0)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def to_csv(metrics: list[str], rows: list[dict]) -> str:
    """Machine-readable: one ``<metric>_mean`` and ``<metric>_std`` column per metric."""
    buf = io.StringIO()
    fields = ["run", "method", "seeds"]
    for m in [*metrics, "wall_s", "peak_memory_mb"]:
        fields += [f"{m}_mean", f"{m}_std"]
    fields += ["trainable_params", "total_params"]
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        out = {k: row[k] for k in ("run", "method", "seeds", "trainable_params", "total_params")}
        for m in [*metrics, "wall_s", "peak_memory_mb"]:
            mean, std = row[m] if row[m] is not None else ("", "")
            out[f"{m}_mean"], out[f"{m}_std"] = mean, "" if std is None else std
        writer.writerow(out)
    return buf.getvalue()


def definitions(metrics: list[str], percent: bool = True) -> list[str]:
    """The definition of each metric shown, the std convention and the references."""
    lines = [f"{m}: {METRIC_NOTES.get(m, 'see clpeft.metrics')}" for m in metrics]
    lines.append(f"mean ± sample std over seeds (numpy ddof={DDOF}); one seed: mean only")
    if percent:
        lines.append("accuracy, transfer and forgetting columns in percent points (metrics.json stores fractions)")
    lines.append("wall time = train + eval seconds; peak memory = CUDA max allocated, or the process's max RSS on CPU")
    lines.append("R[i, j] = accuracy on experience j's test data after training experience i; " + "; ".join(REFERENCES))
    return lines


def compare(run_dirs: list[str | Path], percent: bool = True) -> tuple[str, str]:
    """``(markdown with definitions, csv)`` for the given run directories."""
    results = [load_result(d) for d in run_dirs]
    metrics, rows = comparison_rows(results, percent)
    notes = "\n".join(f"- {line}" for line in definitions(metrics, percent))
    return f"{to_markdown(metrics, rows, percent)}\n\nMetric definitions:\n{notes}", to_csv(metrics, rows)
