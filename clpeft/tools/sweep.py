"""``clpeft sweep CONFIG --grid key=[v1,v2] ...``: a small grid search that stays honest.

Every point of the grid (the Cartesian product of the ``--grid`` lists) is an ordinary run
directory (one seed, or ``seed_<n>/`` subfolders with ``--seeds``), so ``compare`` and ``report``
read it. The points are ranked by one metric (:data:`LOWER_IS_BETTER` says which way).

**Tune on one stream, evaluate on another.** Picking the best point on the stream whose numbers
are then reported overstates them: the hyperparameters have seen the test data (Cha et al.,
"Hyperparameters in Continual Learning: a Reality Check", 2024, arXiv:2403.09066, who show
that rankings of methods change once tuning and evaluation use different data). With
``--tune-set`` and/or ``--eval-set`` (overrides such as ``scenario.class_order=1993`` or
``scenario.dataset=...``) the grid runs under ``OUT/tune/`` on the tuning stream, and only the
best point runs again under ``OUT/eval/`` on the evaluation stream; that run's numbers are the
ones to report. Without them the summary says that the selection used the reported stream.

``OUT/sweep_summary.json`` and ``OUT/sweep.md`` hold the table of points and the choice.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

from clpeft import config
from clpeft.errors import UserError
from clpeft.metrics import scalar_metric_names
from clpeft.safe_yaml import load_yaml
from clpeft.tools.results import load_result

LOWER_IS_BETTER = {"forgetting", "error_mean"}
DEFAULT_METRIC = "acc_last"


def parse_grid(items: list[str]) -> dict[str, list]:
    """``["strategy.lr=[0.01,0.001]", ...]`` -> ``{"strategy.lr": [0.01, 0.001], ...}``."""
    grid: dict[str, list] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise UserError(f"--grid expects key.sub=[v1,v2,...], got '{item}'")
        values = load_yaml(raw, f"--grid {key}")
        if not isinstance(values, list) or not values:
            raise UserError(f"--grid {key}: expected a non-empty list such as [0.01,0.001], got {raw!r}")
        if key in grid:
            raise UserError(f"--grid {key}: given twice; put every value in one list")
        grid[key] = values
    if not grid:
        raise UserError("clpeft sweep needs at least one --grid key=[v1,v2,...]")
    return grid


def grid_points(grid: dict[str, list]) -> list[dict]:
    """Every combination, the last key varying fastest."""
    return [dict(zip(grid, combo)) for combo in itertools.product(*grid.values())]


def point_name(index: int, point: dict) -> str:
    """``p03-lr=0.01-epochs=2``: an index (unique) and the values (readable), filesystem-safe."""
    parts = [f"{k.rsplit('.', 1)[-1]}={v}" for k, v in point.items()]
    text = "-".join(parts)
    safe = "".join(c if c.isalnum() or c in "=._+" else "-" for c in text)[:80]
    return f"p{index:02d}-{safe}"


def _overrides(point: dict) -> list[str]:
    return [f"{k}={json.dumps(v)}" for k, v in point.items()]


def _score(run_dir: Path, metric: str) -> dict:
    summary = load_result(run_dir).summary()
    stat = summary["metrics"].get(metric)
    if stat is None or isinstance(stat["mean"], list):
        known = [k for k, v in summary["metrics"].items() if not isinstance(v["mean"], list)]
        raise UserError(f"--metric {metric}: not a scalar metric of this run; choose one of {', '.join(known)}")
    wall = summary["timing"].get("train_s", {}).get("mean", 0.0) + summary["timing"].get("eval_s", {}).get("mean", 0.0)
    return {"mean": stat["mean"], "std": stat["std"], "wall_s": wall}


def _check_metric(metric: str, cfg: config.RunConfig) -> None:
    """Refuse, before anything trains, a ``--metric`` the configured runs will not report."""
    known = scalar_metric_names(cfg.scenario.cls.kind, baseline=cfg.eval.baseline, online=bool(cfg.scenario.params.get("online", False)))
    if metric not in known:
        raise UserError(
            f"--metric {metric}: not a scalar metric of a {cfg.scenario.cls.kind} run ({', '.join(known)}){config.close(metric, known)}"
        )


def run_sweep(
    config_path: str | Path,
    grid: dict[str, list],
    out: str | Path,
    engine_kwargs: dict,
    *,
    overrides: list[str] | None = None,
    metric: str = DEFAULT_METRIC,
    tune_set: list[str] | None = None,
    eval_set: list[str] | None = None,
    resume: bool = False,
    on_point=None,
) -> dict:
    """Run the grid (on the tuning stream when given), pick the best point, evaluate it.

    Every config is validated before anything runs. ``on_point(name, score)`` is called after
    each grid point. Returns (and writes) the sweep summary.
    """
    from clpeft.tools.seeds import run_config  # torch: not at import, `clpeft --help` imports this module

    out = Path(out)
    overrides = list(overrides or [])
    separate = bool(tune_set or eval_set)
    points = grid_points(grid)
    names = [point_name(i, p) for i, p in enumerate(points)]
    configs = [config.load(config_path, [*overrides, *(tune_set or []), *_overrides(p)]) for p in points]
    eval_configs = [config.load(config_path, [*overrides, *(eval_set or []), *_overrides(p)]) for p in points] if separate else None
    for cfg in configs + (eval_configs or []):
        _check_metric(metric, cfg)
    grid_dir = out / "tune" if separate else out
    if not resume and any((grid_dir / n).exists() for n in names):
        raise UserError(f"{grid_dir} already holds sweep points; pass --resume to continue or choose another --out")
    rows = []
    for name, point, cfg in zip(names, points, configs):
        run_config(cfg, grid_dir / name, engine_kwargs, resume=resume)
        score = _score(grid_dir / name, metric)
        rows.append({"name": name, "values": point, "dir": str(grid_dir / name), **score})
        if on_point is not None:
            on_point(name, score)
    sign = -1.0 if metric in LOWER_IS_BETTER else 1.0
    best = max(range(len(rows)), key=lambda i: sign * rows[i]["mean"])
    summary = {
        "metric": metric,
        "higher_is_better": metric not in LOWER_IS_BETTER,
        "grid": grid,
        "overrides": overrides,
        "tune_set": tune_set or [],
        "eval_set": eval_set or [],
        "tuned_on_evaluation_stream": not separate,
        "points": rows,
        "best": rows[best]["name"],
        "best_values": rows[best]["values"],
    }
    if separate:
        eval_dir = out / "eval" / names[best]
        run_config(eval_configs[best], eval_dir, engine_kwargs, resume=resume)
        summary["evaluation"] = {"dir": str(eval_dir), **_score(eval_dir, metric)}
    out.mkdir(parents=True, exist_ok=True)
    (out / "sweep_summary.json").write_text(json.dumps(summary, indent=2))
    (out / "sweep.md").write_text(format_sweep(summary) + "\n")
    return summary


def _fmt(mean: float, std: float | None) -> str:
    return f"{mean:.4f}" if std is None else f"{mean:.4f} ± {std:.4f}"


def format_sweep(summary: dict) -> str:
    """The points as a Markdown table, the choice, and where the reportable number comes from."""
    keys = list(summary["grid"])
    metric = summary["metric"]
    stream = "tuning stream" if not summary["tuned_on_evaluation_stream"] else "stream"
    header = ["point", *keys, f"{metric} ({stream})", "wall time (s)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    for row in summary["points"]:
        mark = " (best)" if row["name"] == summary["best"] else ""
        cells = [row["name"] + mark, *[json.dumps(row["values"][k]) for k in keys], _fmt(row["mean"], row["std"]), f"{row['wall_s']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    direction = "highest" if summary["higher_is_better"] else "lowest"
    lines.append(f"\nbest by {direction} {metric}: {summary['best']} {json.dumps(summary['best_values'])}")
    if summary["tuned_on_evaluation_stream"]:
        lines.append(
            "note: chosen on the same stream it is scored on, so this number overstates what the settings "
            "give on new data (Cha et al. 2024, arXiv:2403.09066); use --tune-set/--eval-set for a number to report"
        )
    else:
        ev = summary["evaluation"]
        lines.append(
            f"tuned with {summary['tune_set'] or 'the config as given'}; evaluated with "
            f"{summary['eval_set'] or 'the config as given'}: {metric} = {_fmt(ev['mean'], ev['std'])} "
            f"({ev['dir']}) <- the number to report"
        )
    return "\n".join(lines)
