"""Weights & Biases as a second sink of a run's events (``logging.wandb``; the ``wandb`` extra).

Every numeric field of an event is logged as ``<event>/<field>`` (W&B keeps its own step, so the
event's ``step`` travels as ``<event>/step``), the resolved config is the run's config, and the
final scalar metrics go to the run's summary. A run directory maps to one W&B run id, so
``--resume`` continues the same W&B run. ``mode: offline`` writes under ``<run>/wandb/`` for
``wandb sync`` later, as Avalanche's and Mammoth's W&B loggers allow.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

from clpeft.errors import UserError

__all__ = ["WandbSink"]


class WandbSink:
    """One W&B run for one run directory.

    Args:
        out_dir: the run directory (W&B's files go to ``out_dir/wandb``).
        settings: the ``logging.wandb`` section (project, entity, name, tags, mode).
        config: the resolved run config.
    """

    def __init__(self, out_dir: Path, settings, config: dict):
        try:
            import wandb
        except ImportError:
            raise UserError("needs the wandb package: pip install 'clpeft[wandb]' (or drop logging.wandb)", key="logging.wandb") from None
        run_id = hashlib.sha1(str(Path(out_dir).resolve()).encode()).hexdigest()[:16]
        self._run = wandb.init(
            project=settings.project,
            entity=settings.entity,
            name=settings.name or Path(out_dir).name,
            tags=list(settings.tags),
            mode=settings.mode,
            dir=str(out_dir),
            config=config,
            id=run_id,
            resume="allow",
            reinit="create_new",
        )

    def log(self, kind: str, step: int | None, fields: dict) -> None:
        values = {f"{kind}/{name}": value for name, value in fields.items() if _is_number(value)}
        if values:
            if step is not None:
                values[f"{kind}/step"] = step
            self._run.log(values)

    def summary(self, metrics: dict) -> None:
        self._run.summary.update({name: value for name, value in metrics.items() if _is_number(value)})

    def close(self) -> None:
        self._run.finish()


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
