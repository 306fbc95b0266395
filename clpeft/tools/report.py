"""Human-readable views of runs: the metrics table, PNG plots and a self-contained HTML page.

``clpeft report RUN_DIR [RUN_DIR ...] [--out DIR]`` writes into DIR (the run directory itself
when there is one run):

* ``acc_matrix.png`` (one run) or ``acc_matrix_<run>.png``: the heatmap of ``R[i, j]``, the mean
  over seeds for a multi-seed directory;
* ``acc_seen.png``: accuracy on the classes seen so far after each experience, one line per run
  (mean over seeds, a band of ± one sample std);
* ``forgetting.png``: average forgetting after each experience ``i >= 1``,
  ``F_i = 1/i sum_{j<i} (max_{l<i} R[l, j] - R[i, j])`` (Chaudhry et al., 2018), whose last value
  is the run's ``forgetting`` metric;
* ``report.html``: the comparison table (:mod:`clpeft.tools.compare`), the plots embedded as
  base64 data URIs and every accuracy matrix, in one file that opens anywhere.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from clpeft.errors import UserError
from clpeft.plots import accuracy_matrix_figure, curves_figure, pyplot
from clpeft.tools import compare, html_report
from clpeft.tools.results import METRIC_NOTES, load_result


def format_matrix(rows) -> str:
    """The accuracy matrix as aligned text, one row per training step."""
    R = np.asarray(rows, dtype=float)
    header = "after \\ on " + " ".join(f"{f'exp{j}':>6}" for j in range(R.shape[1]))
    lines = [header] + [f"{f'exp{i}':>10} " + " ".join(f"{v:6.3f}" for v in row) for i, row in enumerate(R)]
    return "\n".join(lines)


def format_domains(result: dict) -> str:
    """A test-time-adaptation run: the online error on each domain, then the mean."""
    m = result["metrics"]
    width = max(len(d) for d in result["domains"])
    lines = [f"{'domain':>{width}}  online error"]
    lines += [f"{d:>{width}}  {e:.4f}" for d, e in zip(result["domains"], m["error_per_domain"])]
    lines.append(f"{'mean':>{width}}  {m['error_mean']:.4f}")
    return "\n".join(lines)


def format_metrics(summary: dict) -> str:
    """The named metrics as a two-column table with their definitions."""
    lines = []
    for key, note in METRIC_NOTES.items():
        if key in summary:
            value = "    n/a" if summary[key] is None else f"{summary[key]:+.4f}"
            lines.append(f"{key:>20}  {value}  {note}")
    return "\n".join(lines)


def format_seeds_summary(summary: dict) -> str:
    """The scalar metrics of ``seeds_summary.json`` as mean ± std lines with their definitions."""
    lines = [f"{'':>20}  mean ± std over seeds {summary['seeds']} (ddof={summary['ddof']})"]
    for key, note in METRIC_NOTES.items():
        stat = summary["metrics"].get(key)
        if stat is not None:
            std = "   n/a" if stat["std"] is None else f"{stat['std']:.4f}"
            lines.append(f"{key:>20}  {stat['mean']:+.4f} ± {std}  {note}")
    return "\n".join(lines)


def forgetting_curve(rows) -> list[float]:
    """``F_i`` for ``i = 1..T-1``: ``1/i sum_{j<i} (max_{l<i} R[l, j] - R[i, j])`` (Chaudhry et al., 2018)."""
    R = np.asarray(rows, dtype=float)
    return [float(np.mean(R[:i, :i].max(axis=0) - R[i, :i])) for i in range(1, R.shape[0])]


def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=120)
    pyplot().close(fig)
    return path


def write_plots(results, out: Path) -> dict[str, Path]:
    """The PNGs of the module docstring for ``results`` (:class:`clpeft.tools.results.RunResult`), by name."""
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    for r in results:
        name = "acc_matrix" if len(results) == 1 else f"acc_matrix_{_safe(r.label)}"
        matrices = r.accuracy_matrices()
        title = f"{r.label}: mean of {len(matrices)} seeds" if len(matrices) > 1 else r.label
        paths[name] = _save(accuracy_matrix_figure(matrices.mean(axis=0), title), out / f"{name}.png")
    seen = {r.label: [run["metrics"]["acc_seen"] for run in r.runs.values()] for r in results if _has(r, "acc_seen")}
    if seen:
        paths["acc_seen"] = _save(curves_figure(seen, "accuracy on seen classes"), out / "acc_seen.png")
    forget = {r.label: [forgetting_curve(run["acc_matrix"]) for run in r.runs.values()] for r in results}
    if any(np.size(c) for c in forget.values()):
        paths["forgetting"] = _save(curves_figure(forget, "average forgetting F_i", first_step=1), out / "forgetting.png")
    return paths


def _has(result, metric: str) -> bool:
    return all(metric in run.get("metrics", {}) for run in result.runs.values())


def _safe(label: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in label)


def write_report(run_dirs, out: str | Path | None = None) -> tuple[str, Path]:
    """Plots and ``report.html`` for ``run_dirs``; returns the text to print and the output folder.

    ``out`` defaults to the run directory when there is one run.
    """
    run_dirs = [run_dirs] if isinstance(run_dirs, (str, Path)) else list(run_dirs)
    results = [load_result(d) for d in run_dirs]
    if out is None:
        if len(results) > 1:
            raise UserError("several runs: choose the report folder with --out DIR")
        out = results[0].path
    out = Path(out)
    images = write_plots(results, out)
    markdown, _ = compare.compare(run_dirs)
    (out / "report.html").write_text(html_report.render(results, images))
    if len(results) == 1 and len(results[0].runs) == 1:
        run = next(iter(results[0].runs.values()))
        text = f"{format_matrix(run['acc_matrix'])}\n\n{format_metrics(run['metrics'])}"
    else:
        text = markdown
    return text, out
