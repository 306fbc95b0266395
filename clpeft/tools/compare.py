"""``clpeft compare RUN_DIR ...``: one table of methods x metrics, as Markdown and CSV.

A run directory is a single run (``metrics.json``) or a multi-seed directory
(``seed_<n>/metrics.json``, read by :mod:`clpeft.tools.results`). Each row gives, over the
seeds, the mean ± sample std (``ddof=1``) of every metric, the wall time (train + eval seconds),
the one-off feature-cache fill apart (``cache_s``: computing a frozen backbone's features once,
which a later run may find on disk), the trainable and total parameter counts and the peak memory.
Test-time-adaptation runs are named continual or reset (``scenario.reset_each_domain``) and get
a table of the error on each domain, side by side; few-shot class-incremental runs get one of
the accuracy per session with base/novel accuracy and their harmonic mean
(:mod:`clpeft.tools.breakdowns`). Accuracy-type metrics are shown in percent
unless ``percent=False``. Below the table, the definitions of the metrics used (the formulas of
:mod:`clpeft.metrics`, with their papers) are printed, so a pasted table says what it measures.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

from clpeft.tools.breakdowns import FEW_SHOT, TTA, few_shot_sessions
from clpeft.tools.results import METRIC_NOTES, RunResult, legends, load_result
from clpeft.tools.seed_summary import DDOF, mean_std

#: Scalar metrics in table order; a column appears when some run has it.
METRIC_COLUMNS = (
    "acc_final",
    "acc_last",
    "acc_avg_incremental",
    "bwt",
    "forgetting",
    "fwt",
    "session_acc_mean",
    "base_acc_last",
    "novel_acc_last",
    "harmonic_mean_last",
    "error_mean",
    "a_auc",
    "acc_anytime_last",
    "samples_per_s",
)
PERCENT_METRICS = set(METRIC_COLUMNS) - {"samples_per_s"}
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
        row: dict = {"run": result.label, "method": result.setting, "seeds": len(result.runs)}
        for m in metrics:
            stat = summary["metrics"].get(m)
            scale = 100.0 if percent and m in PERCENT_METRICS else 1.0
            row[m] = None if stat is None else (stat["mean"] * scale, None if stat["std"] is None else stat["std"] * scale)
        walls = [r["timing"]["train_s"] + r["timing"]["eval_s"] for r in result.runs.values()]
        row["wall_s"] = _stat(walls)
        caches = [r["timing"]["cache_s"] for r in result.runs.values() if "cache_s" in r["timing"]]
        row["cache_s"] = _stat(caches) if len(caches) == len(result.runs) else None  # older files: not measured
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


def _seed_stat(values: list) -> tuple[float, float | None] | None:
    """Mean ± std over seeds of one entry (None where a seed has none)."""
    return None if any(v is None for v in values) else _stat(values)


def domain_table(results: list[RunResult], percent: bool = True) -> tuple[list[str], list[list[str]]] | None:
    """Test-time-adaptation runs side by side: one row per domain (the union, in stream order),
    one column per run, the online error (mean ± std over seeds), then the mean over domains."""
    tta = [r for r in results if r.kind == TTA]
    if not tta:
        return None
    scale, digits = (100.0, 2) if percent else (1.0, 4)
    errors = [[dict(zip(run["domains"], run["metrics"]["error_per_domain"])) for run in r.runs.values()] for r in tta]
    domains = list(dict.fromkeys(d for r in tta for run in r.runs.values() for d in run["domains"]))
    rows = [[d, *[_fmt(_seed_stat([e[d] * scale if d in e else None for e in per_seed]), digits) for per_seed in errors]] for d in domains]
    rows.append(["mean", *[_fmt(_seed_stat([run["metrics"]["error_mean"] * scale for run in r.runs.values()]), digits) for r in tta]])
    return ["domain", *legends(tta)], rows


def session_table(results: list[RunResult], percent: bool = True) -> tuple[list[str], list[list[str]]] | None:
    """Few-shot class-incremental runs: per session, the accuracy on all seen classes, on the base
    classes, on the novel ones and their harmonic mean (:func:`clpeft.tools.breakdowns.few_shot_sessions`)."""
    fscil = [r for r in results if r.kind == FEW_SHOT]
    if not fscil:
        return None
    scale, digits = (100.0, 2) if percent else (1.0, 4)
    keys = ("session_acc", "base_acc", "novel_acc", "harmonic_mean")
    rows = []
    for result, name in zip(fscil, legends(fscil)):
        per_seed = [few_shot_sessions(run) for run in result.runs.values()]
        for i in range(len(per_seed[0]["session_acc"])):
            cells = [_fmt(_seed_stat([None if p[k][i] is None else p[k][i] * scale for p in per_seed]), digits) for k in keys]
            rows.append([name, str(i), *cells])
    return ["method", "session", "acc (seen)", "base", "novel", "harmonic mean"], rows


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(cells) + " |" for cells in rows])


def to_markdown(metrics: list[str], rows: list[dict], percent: bool = True) -> str:
    unit = " (%)" if percent else ""
    header = [
        "run",
        "method",
        "seeds",
        *[f"{m}{unit}" for m in metrics],
        "wall time (s)",
        "cache fill (s)",
        "trainable params",
        "peak memory (MB)",
    ]
    digits = 2 if percent else 4
    table = []
    for row in rows:
        cells = [
            row["run"],
            row["method"],
            str(row["seeds"]),
            *[_fmt(row[m], digits) for m in metrics],
            _fmt(row["wall_s"], 1),
            _fmt(row["cache_s"], 1),
            _count(row["trainable_params"]),
            _fmt(row["peak_memory_mb"], 0),
        ]
        table.append(cells)
    return markdown_table(header, table)


def to_csv(metrics: list[str], rows: list[dict]) -> str:
    """Machine-readable: one ``<metric>_mean`` and ``<metric>_std`` column per metric."""
    buf = io.StringIO()
    fields = ["run", "method", "seeds"]
    for m in [*metrics, "wall_s", "cache_s", "peak_memory_mb"]:
        fields += [f"{m}_mean", f"{m}_std"]
    fields += ["trainable_params", "total_params"]
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        out = {k: row[k] for k in ("run", "method", "seeds", "trainable_params", "total_params")}
        for m in [*metrics, "wall_s", "cache_s", "peak_memory_mb"]:
            mean, std = row[m] if row[m] is not None else ("", "")
            out[f"{m}_mean"], out[f"{m}_std"] = mean, "" if std is None else std
        writer.writerow(out)
    return buf.getvalue()


def definitions(metrics: list[str], percent: bool = True) -> list[str]:
    """The definition of each metric shown, the std convention and the references."""
    lines = [f"{m}: {METRIC_NOTES.get(m, 'see clpeft.metrics')}" for m in metrics]
    if "error_mean" in metrics:
        lines.append(
            "continual: one model adapts through the domains in order; reset: each domain starts from the "
            "source model (scenario.reset_each_domain)"
        )
    if "harmonic_mean_last" in metrics:
        lines.append(
            "per session i: base = R[i, 0] (the classes of session 0), novel = the classes added in sessions "
            "1..i (weighted by test size), harmonic mean = 2 base novel / (base + novel) (Peng et al. 2022)"
        )
    lines.append(f"mean ± sample std over seeds (numpy ddof={DDOF}); one seed: mean only")
    if percent:
        lines.append("accuracy, transfer and forgetting columns in percent points (metrics.json stores fractions)")
    lines.append(
        "wall time = train + eval seconds, without the feature-cache fill (cache fill: computing the frozen "
        "backbone's features once; – in files written before it was timed apart); peak memory = CUDA max "
        "allocated, or the process's max RSS on CPU"
    )
    lines.append("R[i, j] = accuracy on experience j's test data after training experience i; " + "; ".join(REFERENCES))
    return lines


def compare(run_dirs: list[str | Path], percent: bool = True) -> tuple[str, str]:
    """``(markdown with definitions, csv)`` for the given run directories."""
    results = [load_result(d) for d in run_dirs]
    metrics, rows = comparison_rows(results, percent)
    unit = " (%)" if percent else ""
    parts = [to_markdown(metrics, rows, percent)]
    for title, table in (
        (f"Online error per domain{unit}", domain_table(results, percent)),
        (f"Accuracy per session{unit}", session_table(results, percent)),
    ):
        if table is not None:
            parts.append(f"{title}:\n{markdown_table(*table)}")
    notes = "\n".join(f"- {line}" for line in definitions(metrics, percent))
    return "\n\n".join(parts) + f"\n\nMetric definitions:\n{notes}", to_csv(metrics, rows)
