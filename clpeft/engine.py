"""The experience loop: train, evaluate the full accuracy matrix, log, checkpoint, resume.

For a stream of ``T`` experiences the engine

1. evaluates the untrained model on every test set (the FWT baseline ``b``),
2. for each experience ``i``: re-seeds from ``(seed, i)``, calls ``before_experience``,
   trains on ``train_data`` for ``train.epochs`` epochs (``training_step``, backward, optimizer
   step, ``after_training_step``), calls ``after_experience`` (both experience hooks in eval
   mode, on the device), evaluates
   on **every** experience's test set (row ``R[i, :]``, future experiences included), and
   writes a checkpoint;
3. writes ``metrics.json`` with :func:`clpeft.metrics.summarize` of ``R`` and, from the last
   evaluation, ``final_confusion[true][predicted]`` (counts over every test set; files written
   before it lack the key, and so does a run whose strategy scores its own outputs, such as
   generated text: :meth:`clpeft.run.Run.correct`). ``timing`` keeps the feature cache's
   one-off fill (``cache_s``, per experience and in total) apart from ``train_s`` and
   ``eval_s``, which exclude it.

Re-seeding per experience makes ``--resume`` exact: a resumed run continues from the last
checkpoint with the same random state an uninterrupted run had at that point.

**Online streams** (a scenario with ``online: true``; :meth:`Engine._run_online`) are learned in
one pass, in training units (the experiences, or task-free chunks), with anytime evaluation
between optimizer steps and the accuracy-matrix row at every experience's end; see
:mod:`clpeft.online`.

Few-shot class-incremental streams run the same loop; ``metrics.json`` adds the session
metrics of :func:`clpeft.metrics.few_shot_summary`. A scenario's :meth:`save_artifacts` writes
its own files into the run directory (the drawn few-shot indices).

**Test-time adaptation** (scenario kind ``test_time_adaptation``; see :meth:`Engine._run_tta`):

1. source phase (experience 0): the strategy trains on ``scenario.source`` with the loop above
   (``train.epochs``, ``training_step``), or loads ``scenario.source_checkpoint``; the result is
   saved as ``source/exp_000.pt``;
2. for each domain experience ``1..D``: the source state is restored first when
   ``scenario.reset_each_domain``; ``before_experience(exp)``; the domain's test data is read in
   stream order (no shuffle) in batches of ``train.batch_size`` and every batch goes to
   ``logits = strategy.adapt(x)`` under ``torch.enable_grad()``: **inputs only**. The engine
   keeps the labels and scores each online prediction (:class:`OnlineScorer`); the strategy's
   hooks see experiences whose ``test`` is None, so labels never reach it. ``adapt`` runs its
   own optimizer steps on the parameters it chooses. Then ``after_experience(exp)`` and a
   checkpoint: ``--resume`` continues at the next domain, bitwise.

``metrics.json`` of a TTA run holds ``error_per_domain``, ``error_mean`` and ``error_overall``
(:func:`clpeft.metrics.tta_summary`), ``domains`` (their names), and as ``acc_matrix`` a single
row: the online accuracy on each domain (there is no per-experience re-evaluation).

A CUDA out-of-memory error becomes a :class:`~clpeft.errors.RunError` naming the batch size in
use and the setting to lower.

The engine owns the run directory and the order of things; :class:`clpeft.run.Run` (what
:meth:`Engine.build` returns) holds the built stream and strategy and performs the steps:
training (:mod:`clpeft.training`), evaluation, online adaptation.

**Several processes** (``torchrun --nproc_per_node N -m clpeft run ...``): training is
data-parallel (DistributedDataParallel over each rank's share of every global batch),
evaluation is sharded with all-reduced counts, only rank 0 writes, and every rank resumes from
the same checkpoint; :mod:`clpeft.distributed` lists what is synchronised.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
import yaml

from clpeft import checkpoint, distributed, metrics
from clpeft.config import RunConfig
from clpeft.errors import UserError
from clpeft.experience import Experience
from clpeft.logging import RunLogger
from clpeft.online import OnlinePlan, plan_online
from clpeft.provenance import provenance
from clpeft.run import Run, build_run, peak_memory_mb, resolve_device
from clpeft.run_directory import Prepared, export_weights, format_changes, prepare, read_source_checkpoint, write_atomic
from clpeft.seeding import derive_seed, seed_everything

__all__ = ["Engine"]

# What each kind of checkpoint must hold to be resumed from (one missing a key is skipped).
_CIL_KEYS = ("experience", "strategy", "rows", "timing", "baseline")
_SOURCE_KEYS = ("experience", "strategy", "timing")
_TTA_KEYS = ("experience", "strategy", "correct", "counts", "timing")
_ONLINE_KEYS = ("experience", "strategy", "rows", "curve", "timing", "baseline")


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

    def _accept_forced_config(self, log: RunLogger) -> None:
        """After a ``--resume --force`` loaded its checkpoint: record the changes, then store the new config."""
        forced = self._prepared.forced
        if not forced or not self.world.is_main:
            return
        log.event("config_forced", changes=[{"key": k, "stored": a, "now": b} for k, a, b in forced], previous=self._prepared.stored)
        log.print(f"resumed with a changed config (--force): {format_changes(forced)}")
        write_atomic(self.out_dir / "config.yaml", yaml.safe_dump(self._resolved_config(), sort_keys=False))

    # ------------------------------------------------------------------ the loop

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
                    return self._run_tta(self.built, log)
                if self.built.scenario.online is not None:
                    return self._run_online(self.built, log)
                return self._run(self.built, log)
            finally:
                log.close()
        finally:
            torch.use_deterministic_algorithms(previous)
            if self._prepared.lock is not None:
                self._prepared.lock.release()

    def _run(self, run: Run, log: RunLogger) -> dict:
        stream, strategy = run.stream, run.strategy
        T = len(stream)
        rows: list[list[float]] = []
        timing: list[dict] = []
        baseline = None
        start = 0
        if self.resume:
            found = self._load_latest(self.out_dir / "checkpoints", log, _CIL_KEYS)
            if found is not None:
                path, state = found
                if state["experience"] >= T or len(state["rows"]) != state["experience"] + 1:
                    raise UserError(
                        f"{path} was taken after experience {state['experience']} of a stream with "
                        f"{len(state['rows'][-1]) if state['rows'] else '?'} experiences; this one has {T}"
                    )
                run.load_strategy(state["strategy"], source=path)
                rows, timing, baseline = state["rows"], state["timing"], state["baseline"]
                start = state["experience"] + 1
                log.event("resumed", checkpoint=path.name, next_experience=start)
                log.print(f"resumed from {path.name}: continuing at experience {start}/{T}")
            self._accept_forced_config(log)
        log.event(
            "run_start", experiences=T, device=str(self.device), strategy=self.cfg.strategy.name, parameters=strategy.count_parameters()
        )
        cache_mark = run.cache_seconds()  # the baseline's feature-cache fill counts with experience 0's
        if start == 0 and self.cfg.eval.baseline:
            baseline = run.baseline()
            log.event("baseline", accuracy=baseline)
        confusion = None
        for exp in stream[start:]:
            seed_everything(derive_seed(self.cfg.seed, exp.index))
            before = run.cache_seconds()
            train_s, n_samples = run.train_experience(exp, log)
            train_s -= run.cache_seconds() - before
            t0, before = time.perf_counter(), run.cache_seconds()
            if exp.index == T - 1 and not run.scores_itself:  # the last evaluation also counts (true, predicted) class pairs
                confusion = torch.zeros(run.n_classes, run.n_classes, dtype=torch.float64)
            strategy.before_evaluation(exp)
            row = run.evaluate(confusion=confusion)
            strategy.after_evaluation(exp, row)
            eval_s = time.perf_counter() - t0 - (run.cache_seconds() - before)
            rows.append(row)
            timing.append(
                {
                    "experience": exp.index,
                    "train_s": train_s,
                    "eval_s": eval_s,
                    "cache_s": run.cache_seconds() - cache_mark,
                    "train_samples_per_s": n_samples / train_s if train_s > 0 else None,
                    "peak_memory_mb": peak_memory_mb(self.device),
                }
            )
            cache_mark = run.cache_seconds()
            seen = float(np.average(row[: exp.index + 1], weights=[len(e.test) for e in stream[: exp.index + 1]]))
            log.event("experience_end", step=exp.index, acc_seen=seen, row=row, **{f"acc_exp{j}": a for j, a in enumerate(row)})
            log.print(f"experience {exp.index + 1}/{T}: acc on seen = {seen:.4f}  row = [{', '.join(f'{a:.3f}' for a in row)}]")
            distributed.check_consistent(self.world, strategy, f"experience {exp.index}")
            if self.world.is_main:
                checkpoint.save(
                    self.out_dir / "checkpoints",
                    exp.index,
                    {
                        "experience": exp.index,
                        "strategy": strategy.state_dict(),
                        "rows": rows,
                        "timing": timing,
                        "baseline": baseline,
                        "config": self._resolved_config(),
                    },
                    keep=self.cfg.logging.keep_checkpoints,
                )
        return self._finish(run, rows, timing, baseline, log, confusion=confusion)

    # ------------------------------------------------------------------ online streams

    def _run_online(self, run: Run, log: RunLogger) -> dict:
        """One pass over the stream in training units, with anytime evaluation (:mod:`clpeft.online`)."""
        protocol, strategy = run.scenario.online, run.strategy
        plan = plan_online(run.stream, protocol, self.cfg.train.batch_size)
        rows, curve, timing, baseline, start = [], [], [], None, 0
        if self.resume:
            found = self._load_latest(self.out_dir / "checkpoints", log, _ONLINE_KEYS)
            if found is not None:
                path, state = found
                if state["experience"] >= len(plan.units):
                    raise UserError(f"{path} was taken after training unit {state['experience']}; this online stream has {len(plan.units)}")
                run.load_strategy(state["strategy"], source=path)
                rows, curve, timing, baseline = state["rows"], state["curve"], state["timing"], state["baseline"]
                start = state["experience"] + 1
                log.event("resumed", checkpoint=path.name, next_experience=start)
                log.print(f"resumed from {path.name}: continuing at training unit {start}/{len(plan.units)}")
            self._accept_forced_config(log)
        log.event(
            "run_start",
            experiences=len(run.stream),
            units=len(plan.units),
            stream_samples=plan.n_samples,
            device=str(self.device),
            strategy=self.cfg.strategy.name,
            parameters=strategy.count_parameters(),
        )
        cache_mark = run.cache_seconds()  # the baseline's feature-cache fill counts with the first unit's
        if start == 0 and self.cfg.eval.baseline:
            baseline = run.baseline()
            log.event("baseline", accuracy=baseline)
        for unit, (a, b) in zip(plan.units[start:], plan.spans[start:]):
            seed_everything(derive_seed(self.cfg.seed, unit.index))
            pending = plan.points_in(a, b)
            eval_s = 0.0

            # (the two closures read this iteration's variables, and run only within it)
            def evaluate_until(position: int) -> None:
                nonlocal eval_s
                t, cached = time.perf_counter(), run.cache_seconds()
                while pending and pending[0] <= position:  # noqa: B023
                    self._online_point(run, plan, pending.pop(0), unit, rows, curve, log)  # noqa: B023
                eval_s += time.perf_counter() - t - (run.cache_seconds() - cached)

            def after_step(trained: int) -> None:  # points strictly inside the unit, between two steps
                position = min(a + (b - a) * trained // n_view, b - 1)  # noqa: B023
                if pending and pending[0] <= position:  # noqa: B023
                    with run.training_paused():
                        evaluate_until(position)

            t0, before = time.perf_counter(), run.cache_seconds()
            data = run.prepare(unit)
            n_view = max(len(data), 1)  # after_step's position: the pass over data, mapped onto [a, b)
            run.fit(unit, data, log, after_step=after_step, warn_few_steps=False)
            run.conclude(unit)
            train_s = time.perf_counter() - t0 - eval_s - (run.cache_seconds() - before)
            evaluate_until(b)
            timing.append(
                {
                    "experience": unit.index,
                    "stream_samples": b - a,
                    "train_s": train_s,
                    "eval_s": eval_s,
                    "cache_s": run.cache_seconds() - cache_mark,
                    "train_samples_per_s": (b - a) / train_s if train_s > 0 else None,
                    "peak_memory_mb": peak_memory_mb(self.device),
                }
            )
            cache_mark = run.cache_seconds()
            if self.world.is_main:
                checkpoint.save(
                    self.out_dir / "checkpoints",
                    unit.index,
                    {
                        "experience": unit.index,
                        "strategy": strategy.state_dict(),
                        "rows": rows,
                        "curve": curve,
                        "timing": timing,
                        "baseline": baseline,
                        "config": self._resolved_config(),
                    },
                    keep=self.cfg.logging.keep_checkpoints,
                )
        online = metrics.anytime_summary(curve, plan.n_samples, sum(t["train_s"] for t in timing))
        log.print(
            f"online: A_auc = {online['a_auc'] if online['a_auc'] is None else round(online['a_auc'], 4)} over "
            f"{len(curve)} evaluation points, {plan.n_samples} stream samples"
        )
        return self._finish(run, rows, timing, baseline, log, extra_metrics=online)

    def _online_point(self, run: Run, plan: OnlinePlan, position: int, unit: Experience, rows: list, curve: list, log: RunLogger) -> None:
        """Evaluate at stream ``position``: the anytime accuracy and/or, at an experience's end, its matrix row."""
        if position in plan.eval_points:
            accuracy = run.accuracy(plan.seen_test(position))
            curve.append([position, accuracy])
            log.event("anytime", step=position, samples=position, accuracy=accuracy)
        if position in plan.task_ends:
            exp = run.stream[plan.task_ends.index(position)]
            facing = not run.scenario.online.task_free  # the strategy knows of this evaluation
            if facing:
                run.strategy.before_evaluation(unit)
            row = run.evaluate()
            if facing:
                run.strategy.after_evaluation(unit, row)
            rows.append(row)
            seen = float(np.average(row[: exp.index + 1], weights=[len(e.test) for e in run.stream[: exp.index + 1]]))
            log.event(
                "experience_end",
                step=exp.index,
                acc_seen=seen,
                row=row,
                samples=position,
                **{f"acc_exp{j}": acc for j, acc in enumerate(row)},
            )
            log.print(
                f"experience {exp.index + 1}/{len(run.stream)} (after {position} stream samples): acc on seen = "
                f"{seen:.4f}  row = [{', '.join(f'{acc:.3f}' for acc in row)}]"
            )

    # ------------------------------------------------------------------ test-time adaptation

    def _run_tta(self, run: Run, log: RunLogger) -> dict:
        """Source phase, then online adaptation domain by domain (see the module docstring)."""
        scenario, stream, strategy = run.scenario, run.stream, run.strategy
        classes = list(range(len(scenario.class_names)))
        source_exp = Experience(0, scenario.source, None, classes, classes, domain="source")
        facing = [source_exp]  # what the strategy's hooks see: no test data, so no labels
        for exp in stream:
            facing.append(dataclasses.replace(exp, test=None, past=tuple(facing)))
        ckpt_dir, source_dir = self.out_dir / "checkpoints", self.out_dir / "source"
        log.event(
            "run_start",
            experiences=len(stream),
            device=str(self.device),
            strategy=self.cfg.strategy.name,
            parameters=strategy.count_parameters(),
        )
        found = self._load_latest(ckpt_dir, log, _TTA_KEYS) if self.resume else None
        needs_source = found is None or scenario.reset_each_domain
        source = self._load_latest(source_dir, log, _SOURCE_KEYS) if self.resume and needs_source else None
        if found is not None:
            state = found[1]
            if state["experience"] > len(stream):
                raise UserError(f"{found[0]} was taken after domain {state['experience']}; this stream has {len(stream)}")
            run.load_strategy(state["strategy"], source=found[0])
            correct, counts, timing = state["correct"], state["counts"], state["timing"]
            start = state["experience"] + 1
            log.event("resumed", checkpoint=found[0].name, next_experience=start)
            log.print(f"resumed from {found[0].name}: continuing at domain {start}/{len(stream)}")
        elif source is not None:  # killed after the source phase, before the first domain ended
            run.load_strategy(source[1]["strategy"], source=source[0])
            correct, counts, timing, start = [], [], source[1]["timing"], 1
        else:
            correct, counts, start = [], [], 1
            timing = self._source_phase(run, source_exp, log)
            checkpoint.save(
                source_dir,
                0,
                {"experience": 0, "strategy": strategy.state_dict(), "timing": timing, "config": self._resolved_config()},
                keep=1,
            )
        if self.resume:
            self._accept_forced_config(log)
        source_state = None
        if scenario.reset_each_domain:  # the saved source state, read once (a copy the adaptation cannot touch)
            source_state = (source or self._load_latest(source_dir, log, _SOURCE_KEYS))[1]["strategy"]
        for exp, scored in zip(facing[start:], stream[start - 1 :]):
            seed_everything(derive_seed(self.cfg.seed, exp.index))
            if source_state is not None:
                run.load_strategy(source_state)
            scorer, seconds, n_batches = run.adapt_domain(exp, scored.test)
            correct.append(scorer.correct)
            counts.append(scorer.count)
            timing.append(
                {
                    "experience": exp.index,
                    "domain": exp.domain,
                    "adapt_s": seconds,
                    "batches": n_batches,
                    "samples_per_s": scorer.count / seconds if seconds > 0 else None,
                    "peak_memory_mb": peak_memory_mb(self.device),
                }
            )
            error = 1.0 - scorer.correct / scorer.count
            log.event("domain_end", step=exp.index, domain=exp.domain, error=error, accuracy=1.0 - error)
            log.print(f"domain {exp.index}/{len(stream)} ({exp.domain}): online error = {error:.4f}")
            checkpoint.save(
                ckpt_dir,
                exp.index,
                {
                    "experience": exp.index,
                    "strategy": strategy.state_dict(),
                    "correct": correct,
                    "counts": counts,
                    "timing": timing,
                    "config": self._resolved_config(),
                },
                keep=self.cfg.logging.keep_checkpoints,
            )
        return self._finish_tta(run, correct, counts, timing, log)

    @staticmethod
    def _load_latest(directory: Path, log: RunLogger, required: tuple[str, ...]) -> tuple[Path, dict] | None:
        """The newest good checkpoint holding ``required``; every skipped one is logged and printed with the reason."""

        def skipped(path: Path, reason: str) -> None:
            log.event("checkpoint_skipped", file=str(path), reason=reason)
            log.print(f"skipped checkpoint {path.name}: {reason}; using an earlier one")

        return checkpoint.load_latest(directory, on_skip=skipped, required=required)

    def _source_phase(self, run: Run, source_exp: Experience, log: RunLogger) -> list[dict]:
        """Train the source model on clean data (experience 0), or load ``source_checkpoint``."""
        path = run.scenario.source_checkpoint
        if path is not None:
            run.load_strategy(read_source_checkpoint(Path(path).expanduser()), partial=True)
            log.event("source_loaded", path=str(path))
            return [{"experience": 0, "domain": "source", "train_s": 0.0, "peak_memory_mb": peak_memory_mb(self.device)}]
        seed_everything(derive_seed(self.cfg.seed, 0))
        train_s, n_samples = run.train_experience(source_exp, log)
        log.event("source_trained", step=0, train_s=train_s)
        return [
            {
                "experience": 0,
                "domain": "source",
                "train_s": train_s,
                "train_samples_per_s": n_samples / train_s if train_s > 0 else None,
                "peak_memory_mb": peak_memory_mb(self.device),
            }
        ]

    def _finish_tta(self, run: Run, correct, counts, timing, log: RunLogger) -> dict:
        summary = metrics.tta_summary(correct, counts)
        adapt = [t for t in timing if "adapt_s" in t]
        adapt_s = sum(t["adapt_s"] for t in adapt)
        result = {
            "acc_matrix": [[c / n for c, n in zip(correct, counts)]],
            "test_sizes": list(counts),
            "domains": [e.domain for e in run.stream],
            "baseline": None,
            "metrics": summary,
            "timing": {
                "experiences": timing,
                "train_s": timing[0].get("train_s", 0.0),
                "eval_s": adapt_s,
                "s_per_batch": adapt_s / max(sum(t["batches"] for t in adapt), 1),
                "peak_memory_mb": max(t["peak_memory_mb"] for t in timing),
            },
            "parameters": run.strategy.count_parameters(),
            "provenance": provenance(self.device),
            "class_names": run.scenario.class_names,
        }
        self._write_result(result, run.strategy, log)
        return result

    def _write_result(self, result: dict, strategy, log: RunLogger) -> None:
        """``metrics.json`` (atomically), the final weights, and the scalar metrics as an event (rank 0)."""
        if not self.world.is_main:
            return
        write_atomic(self.out_dir / "metrics.json", json.dumps(result, indent=2))
        export_weights(strategy, self.out_dir / "model.safetensors")
        log.event("metrics", **{k: v for k, v in result["metrics"].items() if not isinstance(v, list)})
        log.hparams(self.cfg.to_dict(), result["metrics"])

    def _finish(
        self, run: Run, rows, timing, baseline, log: RunLogger, extra_metrics: dict | None = None, confusion: torch.Tensor | None = None
    ) -> dict:
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
        self._write_result(result, run.strategy, log)
        if log.tensorboard:
            from clpeft.plots import accuracy_matrix_figure

            log.figure("acc_matrix", accuracy_matrix_figure(rows), step=len(rows))
        return result
