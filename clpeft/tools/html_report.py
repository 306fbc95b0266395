"""A self-contained HTML page for ``clpeft report``: tables, and plots as base64 data URIs.

Nothing is linked: the PNGs are embedded (``<img src="data:image/png;base64,...">``) and the
style is inline, so the single ``report.html`` can be mailed, attached or opened offline.
"""

from __future__ import annotations

import base64
import html
from pathlib import Path

from clpeft.tools import compare

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
        "<tr>" + "".join(
            f'<td class="label">{html.escape(c)}</td>' if k < label_columns else f"<td>{html.escape(c)}</td>"
            for k, c in enumerate(row)) + "</tr>"
        for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _markdown_table(markdown: str) -> tuple[list[str], list[list[str]]]:
    lines = [line.strip().strip("|").split("|") for line in markdown.splitlines() if line.startswith("|")]
    cells = [[c.strip() for c in line] for line in lines]
    return cells[0], cells[2:]


def _figure(path: Path, caption: str) -> str:
    return (f'<figure><img src="{data_uri(path)}" alt="{html.escape(caption)}">'
            f"<figcaption>{html.escape(caption)}</figcaption></figure>")


def _matrix_section(result) -> str:
    matrices = result.accuracy_matrices()
    mean = matrices.mean(axis=0)
    T = mean.shape[1]
    rows = [[f"exp{i}", *[f"{v:.3f}" for v in row]] for i, row in enumerate(mean)]
    what = f"mean over {len(matrices)} seeds" if len(matrices) > 1 else "one run"
    names = next(iter(result.runs.values())).get("class_names")
    classes = f"<p class='note'>classes in stream order: {html.escape(', '.join(map(str, names)))}</p>" if names else ""
    return (f"<h3>{html.escape(result.label)} ({html.escape(result.method)}, {what})</h3>"
            + _table(["after \\ on", *[f"exp{j}" for j in range(T)]], rows) + classes)


def render(results, images: dict[str, Path], title: str = "clpeft report") -> str:
    """The whole page for ``results`` (:class:`clpeft.tools.results.RunResult`) and their plot files."""
    metrics, rows = compare.comparison_rows(results)
    header, body = _markdown_table(compare.to_markdown(metrics, rows))
    notes = "".join(f"<li>{html.escape(line)}</li>" for line in compare.definitions(metrics))
    captions = {
        "acc_seen": "accuracy on the classes seen so far after each experience (band: ± one std over seeds)",
        "forgetting": "average forgetting F_i after each experience (Chaudhry et al., 2018)",
    }
    plots = "".join(_figure(path, captions.get(name, name.replace("_", " "))) for name, path in images.items()
                    if not name.startswith("acc_matrix"))
    heatmaps = "".join(_figure(path, f"accuracy matrix {name[len('acc_matrix_'):]}".strip())
                       for name, path in images.items() if name.startswith("acc_matrix"))
    matrices = "".join(_matrix_section(r) for r in results)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title><style>{_STYLE}</style></head>
<body>
<h1>{html.escape(title)}</h1>
<h2>Comparison</h2>
{_table(header, body, label_columns=2)}
<ul class="note">{notes}</ul>
<h2>Plots</h2>
{plots}
<h2>Accuracy matrices</h2>
{heatmaps}
{matrices}
</body></html>
"""
