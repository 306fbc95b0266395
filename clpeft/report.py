"""Human-readable views of a run: the metrics table and the accuracy-matrix heatmap."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from clpeft.errors import UserError

METRIC_NOTES = {
    "acc_final": "mean_j R[T-1, j] (GEM ACC)",
    "acc_last": "accuracy on all seen test data after the last experience",
    "acc_avg_incremental": "mean over steps of acc on seen data (iCaRL)",
    "bwt": "1/(T-1) sum_j<T-1 R[T-1,j] - R[j,j] (GEM)",
    "forgetting": "1/(T-1) sum_j<T-1 max_l<T-1 R[l,j] - R[T-1,j] (Chaudhry 2018)",
    "fwt": "1/(T-1) sum_j>=1 R[j-1,j] - b_j (GEM)",
}


def load_run(run_dir: str | Path) -> dict:
    """The ``metrics.json`` of a finished run."""
    path = Path(run_dir) / "metrics.json"
    if not path.is_file():
        raise UserError(f"{run_dir}: no metrics.json (is it a finished run directory?)")
    return json.loads(path.read_text())


def format_matrix(rows) -> str:
    """The accuracy matrix as aligned text, one row per training step."""
    R = np.asarray(rows, dtype=float)
    header = "after \\ on " + " ".join(f"{f'exp{j}':>6}" for j in range(R.shape[1]))
    lines = [header] + [f"{f'exp{i}':>10} " + " ".join(f"{v:6.3f}" for v in row) for i, row in enumerate(R)]
    return "\n".join(lines)


def format_metrics(summary: dict) -> str:
    """The named metrics as a two-column table with their definitions."""
    lines = []
    for key, note in METRIC_NOTES.items():
        if key in summary:
            lines.append(f"{key:>20}  {summary[key]:+.4f}  {note}")
    return "\n".join(lines)


def accuracy_matrix_figure(rows):
    """A heatmap of ``R[i, j]`` with the values written in the cells."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    R = np.asarray(rows, dtype=float)
    fig, ax = plt.subplots(figsize=(1.0 + 0.7 * R.shape[1], 0.8 + 0.6 * R.shape[0]))
    im = ax.imshow(R, vmin=0.0, vmax=1.0, cmap="viridis")
    for (i, j), v in np.ndenumerate(R):
        ax.text(j, i, f"{v:.2f}", ha="center", va="center", color="white" if v < 0.6 else "black", fontsize=8)
    ax.set_xlabel("evaluated on experience j")
    ax.set_ylabel("after training experience i")
    ax.set_xticks(range(R.shape[1]))
    ax.set_yticks(range(R.shape[0]))
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    return fig


def write_report(run_dir: str | Path) -> str:
    """Print-ready text for a run and ``acc_matrix.png`` written beside it."""
    run = load_run(run_dir)
    fig = accuracy_matrix_figure(run["acc_matrix"])
    fig.savefig(Path(run_dir) / "acc_matrix.png", dpi=120)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return f"{format_matrix(run['acc_matrix'])}\n\n{format_metrics(run['metrics'])}"
