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


def curves_figure(curves: dict[str, list[list[float]]], ylabel: str, first_step: int = 0, xlabel: str = "after training experience i"):
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
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def domain_errors_figure(domains: list[str], errors: dict[str, list[float]]):
    """Grouped bars: the error on each domain (tick labels: the domain names), one bar per run."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(max(5.5, 0.5 * len(domains) * max(len(errors), 1) + 1.5), 4.0))
    width = 0.8 / max(len(errors), 1)
    x = np.arange(len(domains))
    for k, (label, values) in enumerate(errors.items()):
        ax.bar(x + (k - (len(errors) - 1) / 2) * width, values, width, label=label)
    ax.set_xticks(x)
    ax.set_xticklabels(domains, rotation=45, ha="right", fontsize=8)
    ax.set_ylabel("online error")
    ax.set_ylim(0.0, 1.0)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def confusion_figure(counts, class_names: list[str] | None = None, title: str | None = None, max_ticks: int = 40):
    """The confusion matrix normalised per true class (rows), class names on the axes up to ``max_ticks`` classes."""
    plt = pyplot()
    C = np.asarray(counts, dtype=float)
    rates = C / np.maximum(C.sum(axis=1, keepdims=True), 1.0)
    side = min(2.5 + 0.3 * len(C), 12.0)
    fig, ax = plt.subplots(figsize=(side + 1.0, side))
    im = ax.imshow(rates, vmin=0.0, vmax=1.0, cmap="Blues")
    if len(C) <= max_ticks:
        names = class_names if class_names and len(class_names) == len(C) else [str(k) for k in range(len(C))]
        ax.set_xticks(range(len(C)))
        ax.set_xticklabels(names, rotation=90, fontsize=7)
        ax.set_yticks(range(len(C)))
        ax.set_yticklabels(names, fontsize=7)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    if title:
        ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax, fraction=0.046)
    fig.tight_layout()
    return fig


def per_class_figure(accuracy: dict[str, list[float | None]], class_names: list[str] | None = None, max_ticks: int = 40):
    """Accuracy on each class at the end of the run, one line of markers per run."""
    plt = pyplot()
    n = max(len(a) for a in accuracy.values())
    fig, ax = plt.subplots(figsize=(max(5.5, 0.25 * n + 1.5), 3.6))
    for label, values in accuracy.items():
        ax.plot(
            range(len(values)),
            [np.nan if v is None else v for v in values],
            marker="o",
            markersize=3,
            linestyle="none" if n > 1 else "-",
            label=label,
        )
    if n <= max_ticks:
        ax.set_xticks(range(n))
        ax.set_xticklabels(class_names if class_names and len(class_names) == n else range(n), rotation=90, fontsize=7)
    ax.set_xlabel("class (stream order)")
    ax.set_ylabel("accuracy at the end")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def anytime_figure(curves: dict[str, list[list[list[float]]]]):
    """Anytime accuracy against the stream samples seen (online streams), one line per run.

    ``curves[label]`` holds each seed's points ``[[samples seen, accuracy], ...]``; the line is
    their mean at the points all seeds share (one stream, one ``eval_every``: all of them).
    """
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    for label, per_seed in curves.items():
        common = sorted(set.intersection(*(set(int(n) for n, _ in seed) for seed in per_seed)))
        if not common:
            continue
        by_seed = [dict((int(n), a) for n, a in seed) for seed in per_seed]
        mean = [float(np.mean([s[n] for s in by_seed])) for n in common]
        ax.plot(common, mean, label=f"{label} (n={len(per_seed)})" if len(per_seed) > 1 else label)
    ax.set_xlabel("stream samples seen")
    ax.set_ylabel("anytime accuracy (seen classes)")
    ax.set_ylim(0.0, 1.0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
