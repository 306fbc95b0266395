"""One event API for a run: JSON lines, TensorBoard scalars and images, progress bars.

``log.event(kind, step=..., **fields)`` appends one JSON object to ``events.jsonl`` and writes
every numeric field as a TensorBoard scalar ``<kind>/<field>``. ``log.hparams(config, metrics)``
writes TensorBoard's HParams summary (the flattened config as hyperparameters, the final
metrics as ``hparams/<metric>``), so the runs of a sweep can be filtered and sorted in the HParams
tab when TensorBoard is pointed at their common parent (``tensorboard --logdir sweep_dir``).
Progress bars (tqdm) go to stderr and are shown only when it is a terminal, unless forced.
With ``wandb`` settings every event and the final metrics also go to Weights & Biases
(:mod:`clpeft.wandb_logger`).
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

from tqdm.auto import tqdm


class RunLogger:
    """Writes ``events.jsonl`` and ``tb/`` under ``out_dir``.

    Args:
        out_dir: the run directory.
        tensorboard: write TensorBoard event files.
        progress: ``"auto"`` (bars only on a terminal), ``"always"`` or ``"never"``.
        enabled: ``False`` on non-zero ranks of a distributed run: nothing is written.
    """

    def __init__(
        self, out_dir: Path, tensorboard: bool = True, progress: str = "auto", enabled: bool = True, wandb=None, config: dict | None = None
    ):
        self.out_dir = Path(out_dir)
        self.enabled = enabled
        self.show_progress = enabled and (progress == "always" or (progress == "auto" and sys.stderr.isatty()))
        self._wandb = None
        if enabled and wandb is not None:
            from clpeft.wandb_logger import WandbSink

            self._wandb = WandbSink(self.out_dir, wandb, config or {})
        self._events = open(self.out_dir / "events.jsonl", "a") if enabled else None
        self._tb = None
        if enabled and tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.out_dir / "tb"))

    def event(self, kind: str, step: int | None = None, **fields) -> None:
        """Record one event: a JSON line, plus a TensorBoard scalar per numeric field."""
        if not self.enabled:
            return
        record = {"event": kind, "time": time.time(), **({"step": step} if step is not None else {}), **fields}
        self._events.write(json.dumps(record, default=_jsonable) + "\n")
        self._events.flush()
        if self._wandb is not None:
            self._wandb.log(kind, step, fields)
        if self._tb is not None:
            for name, value in fields.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
                    self._tb.add_scalar(f"{kind}/{name}", value, global_step=step or 0)

    @property
    def tensorboard(self) -> bool:
        return self._tb is not None

    def scalars(self, tag: str, values: dict[str, float], step: int) -> None:
        """Several curves on one TensorBoard chart (e.g. accuracy per experience)."""
        if self._tb is not None:
            self._tb.add_scalars(tag, values, global_step=step)

    def figure(self, tag: str, fig, step: int = 0) -> None:
        """A matplotlib figure as a TensorBoard image."""
        if self._tb is not None:
            self._tb.add_figure(tag, fig, global_step=step)

    def hparams(self, config: dict, metrics: dict) -> None:
        """TensorBoard HParams: ``config`` flattened to ``section.key`` values, scalar ``metrics``.

        Lists and ``None`` become strings (HParams takes numbers, strings and booleans only);
        list metrics (``acc_seen``) are left out.
        """
        if self._wandb is not None:
            self._wandb.summary(metrics)
        if self._tb is None:
            return
        from torch.utils.tensorboard.summary import hparams

        scalars = {
            f"hparams/{k}": float(v)
            for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        }
        experiment, start, end = hparams(flatten_config(config), scalars)
        writer = self._tb._get_file_writer()
        for summary in (experiment, start, end):
            writer.add_summary(summary)
        for tag, value in scalars.items():
            self._tb.add_scalar(tag, value)

    def progress(self, total: int, desc: str):
        """A progress bar (a silent one when bars are off)."""
        return tqdm(total=total, desc=desc, disable=not self.show_progress, leave=False, dynamic_ncols=True, unit="it")

    def print(self, message: str) -> None:
        """A line for the user (stdout), kept out of progress bars."""
        if self.enabled:
            tqdm.write(message, file=sys.stdout)

    def close(self) -> None:
        if self._wandb is not None:
            self._wandb.close()
        if self._events is not None:
            self._events.close()
        if self._tb is not None:
            self._tb.flush()
            self._tb.close()


def flatten_config(config: dict, prefix: str = "") -> dict[str, int | float | str | bool]:
    """``{"train": {"lr": 0.1}}`` -> ``{"train.lr": 0.1}``; lists and ``None`` as strings."""
    flat: dict[str, int | float | str | bool] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten_config(value, name + "."))
        elif isinstance(value, (bool, int, float, str)):
            flat[name] = value
        else:
            flat[name] = json.dumps(value, default=_jsonable)
    return flat


def _jsonable(value):
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)
