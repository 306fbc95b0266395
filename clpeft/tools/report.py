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
* ``old_new.png``: accuracy on the old experiences (``j < i``) and on the new one after each step
  (not for few-shot streams, which have ``sessions.png``: accuracy per session, and
  ``base_novel.png``: base, novel and harmonic-mean accuracy);
* ``confusion.png`` / ``confusion_<run>.png`` and ``per_class.png``: the confusion matrix and the
  accuracy on each class after the last step (runs whose ``metrics.json`` has ``final_confusion``;
  summed over seeds);
* ``anytime.png`` (online streams): the anytime accuracy on the classes seen so far against the
  stream samples seen, one line per run, whose normalised area is ``a_auc`` (Koh et al., 2022);
* ``domain_errors.png`` (test-time adaptation): the online error on each domain, the corruption
  names on the axis, one bar per run (continual and reset side by side);
* ``report.html``: the comparison table (:mod:`clpeft.tools.compare`), the tables of each
  scenario (per domain, per session, old/new, per class), the plots embedded as base64 data URIs
  and every accuracy matrix, in one file that opens anywhere.

Plot legends name the method and its seeds (``replay, seed 0``), not the directory.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from clpeft.errors import UserError
from clpeft.plots import (
    accuracy_matrix_figure,
    anytime_figure,
    confusion_figure,
    curves_figure,
    domain_errors_figure,
    per_class_figure,
    pyplot,
)
from clpeft.tools import compare, html_report
from clpeft.tools.breakdowns import (
    FEW_SHOT,
    TTA,
    few_shot_sessions,
    old_new_accuracy,
    per_class_accuracy,
    scenario_kind,
)
from clpeft.tools.results import METRIC_NOTES, legends, load_result

#: Classes listed one per line in the console; more are summarised by the lowest accuracies.
CONSOLE_CLASSES = 20


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
            value = summary[key]
            shown = "    n/a" if value is None else (f"{value:7.1f}" if key == "samples_per_s" else f"{value:+.4f}")
            lines.append(f"{key:>20}  {shown}  {note}")
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


def _pct(value) -> str:
    return "     –" if value is None else f"{value:6.3f}"


def format_old_new(result: dict) -> str:
    """Accuracy on the old experiences and on the new one after each step (:func:`old_new_accuracy`)."""
    old, new = old_new_accuracy(result["acc_matrix"], result["test_sizes"])
    lines = ["after    old (j<i)  new (j=i)"]
    lines += [f"{f'exp{i}':>5}  {_pct(o):>11}  {_pct(n):>9}" for i, (o, n) in enumerate(zip(old, new))]
    return "\n".join(lines)


def format_sessions(result: dict) -> str:
    """Few-shot sessions: accuracy on all seen classes, base, novel, harmonic mean (:func:`few_shot_sessions`)."""
    s = few_shot_sessions(result)
    keys = ("session_acc", "base_acc", "novel_acc", "harmonic_mean")
    lines = ["session  acc (seen)    base   novel  harmonic mean"]
    lines += [
        f"{i:>7}  {_pct(s[keys[0]][i]):>10}  {_pct(s[keys[1]][i])}  {_pct(s[keys[2]][i])}  {_pct(s[keys[3]][i]):>13}"
        for i in range(len(s["session_acc"]))
    ]
    return "\n".join(lines)


def format_per_class(result: dict) -> str | None:
    """Accuracy on each class after the last step, from ``final_confusion`` (None without it)."""
    if "final_confusion" not in result:
        return None
    accuracy = per_class_accuracy(result["final_confusion"])
    counts = [sum(row) for row in result["final_confusion"]]
    names = _class_names(result, len(accuracy))
    order = list(range(len(accuracy)))
    title = "accuracy per class after the last step"
    if len(order) > CONSOLE_CLASSES:
        order = sorted(order, key=lambda k: (accuracy[k] is None, accuracy[k] or 0.0))[:10]
        title += f" (the 10 lowest of {len(accuracy)}; every class in report.html)"
    width = max(len(names[k]) for k in order)
    return "\n".join([title] + [f"{names[k]:>{width}}  {_pct(accuracy[k])}  ({counts[k]} test samples)" for k in order])


def _class_names(result: dict, n: int) -> list[str]:
    names = result.get("class_names")
    return [str(c) for c in names] if names and len(names) == n else [str(k) for k in range(n)]


def format_run(result: dict, config: dict | None = None) -> str:
    """What ``clpeft run`` (and ``clpeft report`` for one run) prints, as fits the scenario."""
    kind = scenario_kind(result, config)
    if kind == TTA:
        return format_domains(result)
    parts = [
        f"accuracy matrix R[i, j] (after experience i, on experience j):\n{format_matrix(result['acc_matrix'])}",
        format_metrics(result["metrics"]),
    ]
    if len(result["acc_matrix"]) > 1:
        parts.append(format_sessions(result) if kind == FEW_SHOT else format_old_new(result))
    parts.append(format_per_class(result))
    return "\n\n".join(p for p in parts if p)


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
    names = dict(zip((id(r) for r in results), legends(results)))
    incremental = [r for r in results if r.kind != TTA]
    for r in incremental:
        name = "acc_matrix" if len(results) == 1 else f"acc_matrix_{_safe(r.label)}"
        matrices = r.accuracy_matrices()
        title = f"{names[id(r)]}: mean of {len(matrices)} seeds" if len(matrices) > 1 else names[id(r)]
        paths[name] = _save(accuracy_matrix_figure(matrices.mean(axis=0), title), out / f"{name}.png")
    seen = {
        names[id(r)]: [run["metrics"]["acc_seen"] for run in r.runs.values()]
        for r in incremental
        if _has(r, "acc_seen") and r.kind != FEW_SHOT
    }
    if seen:
        paths["acc_seen"] = _save(curves_figure(seen, "accuracy on seen classes"), out / "acc_seen.png")
    forget = {names[id(r)]: [forgetting_curve(run["acc_matrix"]) for run in r.runs.values()] for r in incremental}
    if any(np.size(c) for c in forget.values()):
        paths["forgetting"] = _save(curves_figure(forget, "average forgetting F_i", first_step=1), out / "forgetting.png")
    anytime = {names[id(r)]: [run["metrics"]["anytime_curve"] for run in r.runs.values()] for r in incremental if _has(r, "anytime_curve")}
    if anytime:
        paths["anytime"] = _save(anytime_figure(anytime), out / "anytime.png")
    paths.update(_old_new_plots(incremental, names, out))
    paths.update(_end_of_run_plots(incremental, names, out))
    tta = [r for r in results if r.kind == TTA]
    if tta:
        domains = list(dict.fromkeys(d for r in tta for run in r.runs.values() for d in run["domains"]))
        errors = {names[id(r)]: _mean_error_per_domain(r, domains) for r in tta}
        paths["domain_errors"] = _save(domain_errors_figure(domains, errors), out / "domain_errors.png")
    return paths


def _old_new_plots(results, names: dict, out: Path) -> dict[str, Path]:
    """``old_new.png`` (class- and domain-incremental runs) or ``sessions.png`` and ``base_novel.png`` (few-shot)."""
    paths: dict[str, Path] = {}
    steps = [r for r in results if np.shape(r.accuracy_matrices())[1] > 1]
    old_new, sessions, base_novel = {}, {}, {}
    for r in steps:
        name, runs = names[id(r)], list(r.runs.values())
        if r.kind == FEW_SHOT:
            per_seed = [few_shot_sessions(run) for run in runs]
            sessions[name] = [p["session_acc"] for p in per_seed]
            for key, short in (("base_acc", "base"), ("novel_acc", "novel"), ("harmonic_mean", "harmonic mean")):
                base_novel[f"{name}: {short}"] = [p[key][1:] for p in per_seed]
        else:
            split = [old_new_accuracy(run["acc_matrix"], run["test_sizes"]) for run in runs]
            old_new[f"{name}: old"] = [old[1:] for old, _ in split]
            old_new[f"{name}: new"] = [new[1:] for _, new in split]
    if old_new:
        paths["old_new"] = _save(curves_figure(old_new, "accuracy (old: j < i, new: j = i)", first_step=1), out / "old_new.png")
    if sessions:
        paths["sessions"] = _save(curves_figure(sessions, "accuracy on all seen classes", xlabel="after session i"), out / "sessions.png")
        paths["base_novel"] = _save(curves_figure(base_novel, "accuracy", first_step=1, xlabel="after session i"), out / "base_novel.png")
    return paths


def _end_of_run_plots(results, names: dict, out: Path) -> dict[str, Path]:
    """The confusion matrix of each run and the per-class accuracy of all of them."""
    paths: dict[str, Path] = {}
    per_class = {}
    for r in results:
        counts = r.final_confusion()
        if counts is None:
            continue
        class_names = _class_names(next(iter(r.runs.values())), len(counts))
        key = "confusion" if len(results) == 1 else f"confusion_{_safe(r.label)}"
        paths[key] = _save(confusion_figure(counts, class_names, f"{names[id(r)]}: after the last step"), out / f"{key}.png")
        per_class[names[id(r)]] = (per_class_accuracy(counts), class_names)
    if per_class:
        class_names = next(iter(per_class.values()))[1]
        curves = {name: acc for name, (acc, _) in per_class.items()}
        paths["per_class"] = _save(per_class_figure(curves, class_names), out / "per_class.png")
    return paths


def _mean_error_per_domain(result, domains: list[str]) -> list[float]:
    per_seed = [dict(zip(run["domains"], run["metrics"]["error_per_domain"])) for run in result.runs.values()]
    return [float(np.mean([e[d] for e in per_seed])) if all(d in e for e in per_seed) else float("nan") for d in domains]


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
        text = format_run(next(iter(results[0].runs.values())), results[0].config)
    else:
        text = markdown
    return text, out
