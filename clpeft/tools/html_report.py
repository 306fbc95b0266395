"""A self-contained HTML page for ``clpeft report``: tables, and plots as base64 data URIs.

Nothing is linked: the PNGs are embedded (``<img src="data:image/png;base64,...">``) and the
style is inline, so the single ``report.html`` can be mailed, attached or opened offline.
"""

from __future__ import annotations

import base64
import html
from pathlib import Path

import numpy as np

from clpeft.tools import compare
from clpeft.tools.breakdowns import FEW_SHOT, TTA, old_new_accuracy, per_class_accuracy
from clpeft.tools.results import legends

CAPTIONS = {
    "acc_seen": "accuracy on the classes seen so far after each experience (band: ± one std over seeds)",
    "forgetting": "average forgetting F_i after each experience (Chaudhry et al., 2018)",
    "old_new": "accuracy on the old experiences (j < i, weighted by test size) and on the new one (j = i)",
    "sessions": "accuracy on all classes seen so far after each few-shot session (Tao et al., 2020)",
    "base_novel": "base (session 0's classes), novel (classes added later) and their harmonic mean (Peng et al., 2022)",
    "domain_errors": "online error on each domain (corruption@severity), continual and reset side by side",
    "per_class": "accuracy on each class after the last step",
}

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 70em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th { background: #f3f3f3; } td.label { text-align: left; }
img { max-width: 100%; margin: 0.5em 0; } figure { display: inline-block; margin: 0 1em 1em 0; }
figcaption, .note { color: #555; font-size: 0.85em; }
"""


def data_uri(path: Path) -> str:
    """A PNG file as a ``data:image/png;base64,...`` URI."""
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode("ascii")


def _table(header: list[str], rows: list[list[str]], label_columns: int = 1) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join(
        "<tr>"
        + "".join(
            f'<td class="label">{html.escape(c)}</td>' if k < label_columns else f"<td>{html.escape(c)}</td>" for k, c in enumerate(row)
        )
        + "</tr>"
        for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _markdown_table(markdown: str) -> tuple[list[str], list[list[str]]]:
    lines = [line.strip().strip("|").split("|") for line in markdown.splitlines() if line.startswith("|")]
    cells = [[c.strip() for c in line] for line in lines]
    return cells[0], cells[2:]


def _figure(path: Path, caption: str) -> str:
    return f'<figure><img src="{data_uri(path)}" alt="{html.escape(caption)}"><figcaption>{html.escape(caption)}</figcaption></figure>'


def _matrix_section(result) -> str:
    matrices = result.accuracy_matrices()
    mean = matrices.mean(axis=0)
    T = mean.shape[1]
    rows = [[f"exp{i}", *[f"{v:.3f}" for v in row]] for i, row in enumerate(mean)]
    what = f"mean over {len(matrices)} seeds" if len(matrices) > 1 else "one run"
    names = next(iter(result.runs.values())).get("class_names")
    classes = f"<p class='note'>classes in stream order: {html.escape(', '.join(map(str, names)))}</p>" if names else ""
    return (
        f"<h3>{html.escape(result.label)} ({html.escape(result.legend)}, {what})</h3>"
        + _table(["after \\ on", *[f"exp{j}" for j in range(T)]], rows)
        + classes
    )


def _tables_section(title: str, table, label_columns: int = 1) -> str:
    return "" if table is None else f"<h2>{html.escape(title)}</h2>" + _table(*table, label_columns=label_columns)


def _old_new_section(results) -> str:
    """Per step, the accuracy on old and new experiences (mean over seeds), one table per run."""
    parts = []
    for result, name in zip(results, legends(results)):
        runs = list(result.runs.values())
        if result.kind in (TTA, FEW_SHOT) or len(runs[0]["acc_matrix"]) < 2:
            continue
        split = [old_new_accuracy(run["acc_matrix"], run["test_sizes"]) for run in runs]
        rows = [[f"exp{i}", *[_mean([s[part][i] for s in split]) for part in (0, 1)]] for i in range(len(split[0][1]))]
        parts.append(f"<h3>{html.escape(name)}</h3>" + _table(["after", "old (j < i)", "new (j = i)"], rows))
    return "<h2>Old and new experiences</h2>" + "".join(parts) if parts else ""


def _mean(values) -> str:
    return "–" if any(v is None for v in values) else f"{np.mean(values):.3f}"


def _per_class_section(results, images: dict[str, Path]) -> str:
    """Accuracy on each class after the last step (from ``final_confusion``), and the confusion matrices."""
    with_counts = [(r, name, r.final_confusion()) for r, name in zip(results, legends(results))]
    with_counts = [(r, name, c) for r, name, c in with_counts if c is not None]
    if not with_counts:
        return ""
    n = max(len(c) for _, _, c in with_counts)
    names = next(iter(with_counts[0][0].runs.values())).get("class_names") or list(range(n))
    accuracy = [per_class_accuracy(c) for _, _, c in with_counts]
    rows = [
        [str(names[k]) if k < len(names) else str(k), *[("–" if k >= len(a) or a[k] is None else f"{a[k]:.3f}") for a in accuracy]]
        for k in range(n)
    ]
    figures = "".join(
        _figure(path, f"confusion matrix, rows normalised: {name[len('confusion_') :] or 'this run'}")
        for name, path in images.items()
        if name.startswith("confusion")
    )
    return (
        "<h2>Per-class accuracy and confusion after the last step</h2>"
        + _table(["class", *[name for _, name, _ in with_counts]], rows)
        + figures
    )


def render(results, images: dict[str, Path], title: str = "clpeft report") -> str:
    """The whole page for ``results`` (:class:`clpeft.tools.results.RunResult`) and their plot files."""
    metrics, rows = compare.comparison_rows(results)
    header, body = _markdown_table(compare.to_markdown(metrics, rows))
    notes = "".join(f"<li>{html.escape(line)}</li>" for line in compare.definitions(metrics))
    plots = "".join(
        _figure(path, CAPTIONS.get(name, name.replace("_", " ")))
        for name, path in images.items()
        if not name.startswith(("acc_matrix", "confusion"))
    )
    heatmaps = "".join(
        _figure(path, f"accuracy matrix {name[len('acc_matrix_') :]}".strip())
        for name, path in images.items()
        if name.startswith("acc_matrix")
    )
    matrices = "".join(_matrix_section(r) for r in results if r.kind != TTA)
    scenario = (
        _tables_section("Online error per domain (%)", compare.domain_table(results))
        + _tables_section("Few-shot sessions (%)", compare.session_table(results), label_columns=2)
        + _old_new_section(results)
        + _per_class_section(results, images)
    )
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title><style>{_STYLE}</style></head>
<body>
<h1>{html.escape(title)}</h1>
<h2>Comparison</h2>
{_table(header, body, label_columns=2)}
<ul class="note">{notes}</ul>
{scenario}
<h2>Plots</h2>
{plots}
<h2>Accuracy matrices</h2>
{heatmaps}
{matrices}
</body></html>
"""
