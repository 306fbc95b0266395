"""Matplotlib figures of run results, shared by the engine (TensorBoard) and the report tools.

A leaf module: it imports nothing from clpeft, so the core can draw without the user tools.
"""

from __future__ import annotations

import numpy as np


def pyplot():
    """matplotlib.pyplot on the non-interactive Agg backend (runs without a display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def accuracy_matrix_figure(rows, title: str | None = None):
    """A heatmap of ``R[i, j]`` with the values written in the cells."""
    plt = pyplot()
    R = np.asarray(rows, dtype=float)
    fig, ax = plt.subplots(figsize=(1.0 + 0.7 * R.shape[1], 0.8 + 0.6 * R.shape[0]))
    im = ax.imshow(R, vmin=0.0, vmax=1.0, cmap="viridis")
    for (i, j), v in np.ndenumerate(R):
        ax.text(j, i, f"{v:.2f}", ha="center", va="center", color="white" if v < 0.6 else "black", fontsize=8)
    ax.set_xlabel("evaluated on experience j")
    ax.set_ylabel("after training experience i")
    ax.set_xticks(range(R.shape[1]))
    ax.set_yticks(range(R.shape[0]))
    if title:
        ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    return fig


def curves_figure(curves: dict[str, list[list[float]]], ylabel: str, first_step: int = 0):
    """One line per run (mean over its seeds, band of ± one sample std) against the experience index."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for label, per_seed in curves.items():
        a = np.asarray(per_seed, dtype=float)
        if a.size == 0 or a.shape[1] == 0:
            continue
        x = np.arange(first_step, first_step + a.shape[1])
        mean = a.mean(axis=0)
        ax.plot(x, mean, marker="o", markersize=3, label=f"{label} (n={len(a)})" if len(a) > 1 else label)
        if len(a) > 1:
            std = a.std(axis=0, ddof=1)
            ax.fill_between(x, mean - std, mean + std, alpha=0.2)
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("after training experience i")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
