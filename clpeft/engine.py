"""The engine: one configured experiment in its run directory — build, run or resume, write results.

The engine owns the run directory and the order of the whole: it prepares the directory
(:mod:`clpeft.run_directory`: lock, stored config, ``--resume``/``--force``), builds the run
(:class:`clpeft.run.Run`: the stream and the strategy attached to the data; :meth:`Engine.build`
returns it without writing anything), hands it to the loop for its kind of stream
(:mod:`clpeft.loops`), and writes checkpoints and ``metrics.json``:

- experience by experience (:func:`clpeft.loops.run_experiences`): the evaluated untrained
  model (FWT baseline), then per experience train, evaluate every test set (a row of the
  accuracy matrix), checkpoint; re-seeding per experience from ``(seed, i)`` makes ``--resume``
  exact. Few-shot class-incremental streams run this loop and add the session metrics of
  :func:`clpeft.metrics.few_shot_summary`; a scenario's :meth:`save_artifacts` writes its own
  files into the run directory (the drawn few-shot indices);
- online streams (``scenario.online``; :func:`clpeft.loops.run_online`): one pass with anytime
  evaluation;
- test-time adaptation (:func:`clpeft.loops.run_test_time`): a source phase, then online
  adaptation on unlabelled domains.

``metrics.json`` holds :func:`clpeft.metrics.summarize` of the accuracy matrix ``R`` and, from
the last evaluation, ``final_confusion[true][predicted]`` (counts over every test set; absent
when the strategy scores its own outputs, such as generated text). ``timing`` keeps the
feature cache's one-off fill (``cache_s``, per experience and in total) apart from ``train_s``
and ``eval_s``, which exclude it.

A CUDA out-of-memory error becomes a :class:`~clpeft.errors.RunError` naming the batch size in
use and the setting to lower.

**Several processes** (``torchrun --nproc_per_node N -m clpeft run ...``): training is
data-parallel (DistributedDataParallel over each rank's share of every global batch, or FSDP2
with ``train.sharding: fsdp``: :mod:`clpeft.fsdp`),
evaluation is sharded with all-reduced counts, only rank 0 writes, and every rank resumes from
the same checkpoint; :mod:`clpeft.distributed` lists what is synchronised.
"""

from __future__ import annotations

import json
import os
from contextlib import nullcontext
from pathlib import Path

import torch
import yaml

from clpeft import checkpoint, distributed, fsdp, metrics
from clpeft.components.generative.export import RunExports
from clpeft.config import RunConfig
from clpeft.errors import UserError
from clpeft.logging import RunLogger
from clpeft.loops import run_experiences, run_online, run_test_time
from clpeft.provenance import provenance
from clpeft.run import Run, build_run, resolve_device
from clpeft.run_directory import Prepared, export_weights, format_changes, prepare, write_atomic

__all__ = ["Engine"]


class Engine:
    """Runs one configured continual-learning experiment into ``out_dir``.

    Args:
        cfg: the validated run config.
        out_dir: the run directory (created if needed).
        device: ``"auto"``, ``"cpu"`` or ``"cuda"``.
        resume: continue after the newest valid checkpoint in ``out_dir``.
        force: resume even if the stored config differs from ``cfg``.
        deterministic: use only deterministic algorithms (``torch.use_deterministic_algorithms``);
            on CUDA this also sets ``CUBLAS_WORKSPACE_CONFIG``. Operations without a
            deterministic implementation then raise instead of silently varying.
    """

    def __init__(
        self,
        cfg: RunConfig,
        out_dir: str | Path,
        device: str = "auto",
        resume: bool = False,
        force: bool = False,
        deterministic: bool = False,
    ):
        self.cfg = cfg
        if not str(out_dir).strip():
            raise UserError("--out is empty; name the run directory (an empty name would write into the current one)")
        self.out_dir = Path(out_dir)
        self.world, device = distributed.init_from_env(device)
        self.device = resolve_device(device)
        self.resume = resume
        self.force = force
        self.deterministic = deterministic
        self.built: Run | None = None  # the run being (or last) driven by :meth:`run`
        self._prepared = Prepared()
        if cfg.train.amp == "bf16" and self.device.type != "cuda":
            # bf16 matmuls on CPUs without native support die with SIGILL, not an exception.
            raise UserError("bf16 autocast runs on CUDA only; use amp: auto (bf16 on CUDA, off on CPU) or off", key="train.amp")
        use_amp = cfg.train.amp == "bf16" or (cfg.train.amp == "auto" and self.device.type == "cuda")
        self.autocast = (lambda: torch.autocast(self.device.type, dtype=torch.bfloat16)) if use_amp else nullcontext

    # ------------------------------------------------------------------ setup

    def build(self) -> Run:
        """The run this config describes: its stream, and its strategy attached to the data (nothing
        written). Step it yourself (:class:`~clpeft.run.Run`), or pass it to :meth:`run`.

        Raises:
            UserError: what ``run`` would stop on before training (data, weights, cross-section checks).
        """
        return build_run(self.cfg, self.device, self.world, self.autocast)

    def check(self) -> None:
        """Build everything a run needs without training or writing anything: what ``clpeft validate`` does."""
        self.build()

    def _resolved_config(self) -> dict:
        """The config as run: every default filled in, and ``out`` the directory actually written."""
        return {**self.cfg.to_dict(), "out": str(self.out_dir)}

    # ------------------------------------------------------------------ the run

    def run(self, built: Run | None = None) -> dict:
        """Run (or resume) the experiment; returns the content of ``metrics.json``.

        ``built`` is a run from :meth:`build` to drive instead of building one (a test may wrap
        its strategy's hooks first).
        """
        previous = torch.are_deterministic_algorithms_enabled()
        if self.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)
        try:
            self._prepared = prepare(self.out_dir, self._resolved_config(), self.world, resume=self.resume, force=self.force)
            self.built = built or self.build()
            self.exports = fsdp.WholeCalls(RunExports(self.cfg.logging.export, self.built.strategy, self.out_dir), self.built.strategy)
            if self.world.is_main:
                self.built.scenario.save_artifacts(self.out_dir)
            log = RunLogger(
                self.out_dir,
                self.cfg.logging.tensorboard,
                self.cfg.logging.progress,
                enabled=self.world.is_main,
                wandb=self.cfg.logging.wandb,
                config=self._resolved_config(),
            )
            if self.built.augment is not None and self.built.strategy.backbone.frozen:
                log.print(
                    f"train.augment: {self.cfg.train.augment}; augmented training batches compute their features "
                    f"every step (the feature cache serves evaluation only)"
                )
            try:
                if self.built.scenario.kind == "test_time_adaptation":
                    return run_test_time(self, self.built, log)
                if self.built.scenario.online is not None:
                    return run_online(self, self.built, log)
                return run_experiences(self, self.built, log)
            finally:
                log.close()
        finally:
            torch.use_deterministic_algorithms(previous)
            if self._prepared.lock is not None:
                self._prepared.lock.release()

    # ------------------------------------------------------------------ for the loops (clpeft.loops)

    def load_latest(self, directory: Path, log: RunLogger, required: tuple[str, ...]) -> tuple[Path, dict] | None:
        """The newest good checkpoint in ``directory`` holding ``required``; every skipped one is logged and printed with the reason."""

        def skipped(path: Path, reason: str) -> None:
            log.event("checkpoint_skipped", file=str(path), reason=reason)
            log.print(f"skipped checkpoint {path.name}: {reason}; using an earlier one")

        return checkpoint.load_latest(directory, on_skip=skipped, required=required)

    def accept_forced_config(self, log: RunLogger) -> None:
        """After a ``--resume --force`` loaded its checkpoint: record the changes, then store the new config."""
        forced = self._prepared.forced
        if not forced or not self.world.is_main:
            return
        log.event("config_forced", changes=[{"key": k, "stored": a, "now": b} for k, a, b in forced], previous=self._prepared.stored)
        log.print(f"resumed with a changed config (--force): {format_changes(forced)}")
        write_atomic(self.out_dir / "config.yaml", yaml.safe_dump(self._resolved_config(), sort_keys=False))

    def save_checkpoint(self, directory: Path, index: int, state: dict, keep: int | None = None) -> None:
        """``state`` and the config as run, as checkpoint ``index`` in ``directory`` (the newest
        ``keep`` kept; default ``logging.keep_checkpoints``)."""
        keep = self.cfg.logging.keep_checkpoints if keep is None else keep
        checkpoint.save(directory, index, {**state, "config": self._resolved_config()}, keep=keep)

    def write_result(self, result: dict, strategy, log: RunLogger) -> None:
        """``metrics.json`` (atomically), the final weights (and ``logging.export``'s), and the scalar metrics as an event (rank 0)."""
        if not self.world.is_main:
            return
        write_atomic(self.out_dir / "metrics.json", json.dumps(result, indent=2))
        export_weights(strategy, self.out_dir / "model.safetensors")
        self.exports.after_stream()
        log.event("metrics", **{k: v for k, v in result["metrics"].items() if not isinstance(v, list)})
        log.hparams(self.cfg.to_dict(), result["metrics"])

    def finish(
        self, run: Run, rows, timing, baseline, log: RunLogger, extra_metrics: dict | None = None, confusion: torch.Tensor | None = None
    ) -> dict:
        """Summarise an experience-wise or online run (``rows`` of the accuracy matrix) into
        ``metrics.json``; returns its content."""
        stream = run.stream
        sizes = [len(e.test) for e in stream]
        measurable = metrics.transfer_is_measurable([e.classes_in_this_experience for e in stream])
        summary = metrics.summarize(rows, sizes, baseline if measurable else None)
        if baseline is not None and not measurable:
            summary["fwt"] = None  # n/a: no experience's classes could be predicted before it was trained
        if run.scenario.kind == "few_shot_class_incremental":
            summary.update(metrics.few_shot_summary(rows, sizes))
            for i, acc in enumerate(summary["session_acc"]):
                novel = {} if i == 0 else {k: summary[k][i - 1] for k in ("base_acc", "novel_acc", "harmonic_mean")}
                log.event("session", step=i, acc=acc, **novel)
        summary.update(extra_metrics or {})
        with fsdp.lockstep(run.strategy):
            summary.update(run.strategy.final_metrics())
        result = {
            "acc_matrix": rows,
            "test_sizes": sizes,
            "baseline": baseline,
            "metrics": summary,
            "timing": {
                "experiences": timing,
                "train_s": sum(t["train_s"] for t in timing),
                "eval_s": sum(t["eval_s"] for t in timing),
                "cache_s": sum(t.get("cache_s", 0.0) for t in timing),
                "peak_memory_mb": max(t["peak_memory_mb"] for t in timing),
            },
            "parameters": run.strategy.count_parameters(),
            "provenance": provenance(self.device),
            "class_names": getattr(run.scenario, "class_names", None),
        }
        if confusion is not None:  # final_confusion[true][predicted]: counts over every test set after the last step
            result["final_confusion"] = confusion.round().long().tolist()
        self.write_result(result, run.strategy, log)
        if log.tensorboard:
            from clpeft.plots import accuracy_matrix_figure

            log.figure("acc_matrix", accuracy_matrix_figure(rows), step=len(rows))
        return result
