"""The experience loop: train, evaluate the full accuracy matrix, log, checkpoint, resume.

For a stream of ``T`` experiences the engine

1. evaluates the untrained model on every test set (the FWT baseline ``b``),
2. for each experience ``i``: re-seeds from ``(seed, i)``, calls ``before_experience``,
   trains on ``train_data`` for ``train.epochs`` epochs (``training_step``, backward, optimizer
   step, ``after_training_step``), calls ``after_experience`` (both experience hooks in eval
   mode, on the device), evaluates
   on **every** experience's test set (row ``R[i, :]``, future experiences included), and
   writes a checkpoint;
3. writes ``metrics.json`` with :func:`clpeft.metrics.summarize` of ``R``.

Re-seeding per experience makes ``--resume`` exact: a resumed run continues from the last
checkpoint with the same random state an uninterrupted run had at that point.

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

**Several processes** (``torchrun --nproc_per_node N -m clpeft run ...``): training is
data-parallel (DistributedDataParallel over each rank's share of every global batch),
evaluation is sharded with all-reduced counts, only rank 0 writes, and every rank resumes from
the same checkpoint; :mod:`clpeft.distributed` lists what is synchronised.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import inspect
import json
import math
import os
import random
import resource
import time
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from pathlib import Path

import numpy as np
import torch
import yaml
from torch import nn

from clpeft import checkpoint, distributed, metrics
from clpeft.augment import build_augment
from clpeft.config import RunConfig, read_yaml
from clpeft.data import DataView
from clpeft.data_access import DataAccess
from clpeft.errors import RunError, UserError
from clpeft.experience import Experience
from clpeft.feature_cache import FeatureCache
from clpeft.logging import RunLogger
from clpeft.paths import cache_root
from clpeft.provenance import provenance
from clpeft.resizing import replace_parameters
from clpeft.run_directory import RunLock, config_changes, fixed_changes, format_changes, run_files
from clpeft.strategy import Strategy


_DDP_ARGS = inspect.signature(nn.parallel.DistributedDataParallel).parameters  # init_sync: torch >= 2.4
# Fewer optimizer steps than this in an experience that trains draw a one-line warning.
FEW_STEPS = 10
# What each kind of checkpoint must hold to be resumed from (one missing a key is skipped).
_CIL_KEYS = ("experience", "strategy", "rows", "timing", "baseline")
_SOURCE_KEYS = ("experience", "strategy", "timing")
_TTA_KEYS = ("experience", "strategy", "correct", "counts", "timing")


def _ddp_options() -> dict:
    """No state broadcast at construction or per forward: the ranks hold identical states
    (checked after every experience) and buffers are combined after training."""
    options = {"init_sync": False} if "init_sync" in _DDP_ARGS else {}
    options["forward_sync_buffers" if "forward_sync_buffers" in _DDP_ARGS else "broadcast_buffers"] = False
    return options


def derive_seed(seed: int, *keys) -> int:
    """A 63-bit seed derived from ``seed`` and ``keys`` (stable across processes)."""
    digest = hashlib.sha256(repr((seed, *keys)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available; use --device cpu or auto")
    return torch.device(device)


def make_optimizer(groups: list[dict], train) -> torch.optim.Optimizer | None:
    groups = [g for g in groups if g["params"]]
    if not groups:
        return None
    if train.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=train.lr, momentum=train.momentum, weight_decay=train.weight_decay,
                               nesterov=train.nesterov)
    cls = torch.optim.Adam if train.optimizer == "adam" else torch.optim.AdamW
    return cls(groups, lr=train.lr, weight_decay=train.weight_decay)


def make_scheduler(optimizer: torch.optim.Optimizer, train, steps_per_epoch: int):
    """One experience's learning-rate schedule, stepped after every optimizer step (None: constant).

    ``cosine``: ``lr_t = lr/2 (1 + cos(pi t / T))`` over the experience's ``T`` steps (Loshchilov &
    Hutter, ICLR 2017); ``quarter_cosine``: ``lr * cos(99 pi max(e - 1, 0) / (200 (E - 1)))`` for every
    step of epoch ``e`` of ``E``, exactly what the ``CosineSchedule`` of CODA-Prompt's and InfLoRA's
    code gives per epoch (it resets its counter after construction, so epochs 0 and 1 both run at
    ``lr``; constant when ``E = 1``); ``cosine_epoch``: ``min_lr + (lr - min_lr) (1 + cos(pi e / E)) / 2``
    for every step of epoch ``e`` (``CosineAnnealingLR(T_max=E, eta_min=min_lr)`` stepped once per
    epoch, as LAMDA-PILOT's trainers); ``multistep``: ``lr * gamma^m``
    from the first step of each milestone epoch on, ``m`` the milestones passed (SLCA's x0.1 at
    epoch 18 of 20).
    """
    if train.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=train.epochs * steps_per_epoch)
    if train.schedule == "cosine_epoch":
        return torch.optim.lr_scheduler.LambdaLR(optimizer, [
            functools.partial(_cosine_epoch, base=group["lr"], floor=train.min_lr, epochs=train.epochs,
                              steps_per_epoch=steps_per_epoch) for group in optimizer.param_groups])
    if train.schedule == "quarter_cosine":
        last = max(train.epochs - 1, 1)
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda t: math.cos(99 * math.pi * max(t // steps_per_epoch - 1, 0) / (200 * last)))
    if train.schedule == "multistep":
        return torch.optim.lr_scheduler.MultiStepLR(
            optimizer, milestones=[m * steps_per_epoch for m in train.milestones], gamma=train.gamma)
    return None


def _cosine_epoch(t: int, base: float, floor: float, epochs: int, steps_per_epoch: int) -> float:
    """The factor on ``base`` at step ``t`` of the ``cosine_epoch`` schedule (see :func:`make_scheduler`)."""
    lr = floor + (base - floor) * (1 + math.cos(math.pi * (t // steps_per_epoch) / epochs)) / 2
    return lr / base


def optimizer_step(optimizer: torch.optim.Optimizer, loss: torch.Tensor, clip_grad: float | None,
                   after_backward: Callable[[], None] | None = None) -> None:
    """Backward, ``after_backward`` (the strategy's hook: gradients in place), optional gradient-norm
    clipping, one optimizer step."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if after_backward is not None:
        after_backward()
    if clip_grad is not None:
        torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], clip_grad)
    optimizer.step()


@contextmanager
def _out_of_memory_hint(doing: str, key: str, batch_size: int):
    """Turn CUDA out-of-memory into a RunError that names the batch size to lower."""
    try:
        yield
    except torch.cuda.OutOfMemoryError:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        raise RunError(
            f"CUDA out of memory while {doing} with {key}={batch_size}; lower {key} (e.g. --set {key}={max(1, batch_size // 2)}) "
            f"or use a smaller model or image size (checkpoints of completed experiences are kept)"
        ) from None


class OnlineScorer:
    """Scores the online predictions of a test-time-adaptation domain.

    The only reader of the domain's labels: they are taken from the view here and never leave.
    Batches must come in the view's order, as :meth:`DataAccess.inputs` yields them.
    """

    def __init__(self, view: DataView, device: torch.device):
        self.labels = view.targets.to(device)
        self.correct = 0
        self.count = 0

    def update(self, logits: torch.Tensor) -> None:
        """Add one batch's predictions (``argmax`` of the logits)."""
        labels = self.labels[self.count : self.count + len(logits)]
        if logits.dim() != 2 or len(labels) != len(logits):
            raise RunError(f"adapt returned logits of shape {tuple(logits.shape)} for a batch of {len(labels)} inputs; "
                           f"it must return (batch, classes) logits, one row per input, in order")
        self.correct += int((logits.argmax(dim=1) == labels).sum())
        self.count += len(labels)


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


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

    def __init__(self, cfg: RunConfig, out_dir: str | Path, device: str = "auto", resume: bool = False,
                 force: bool = False, deterministic: bool = False):
        self.cfg = cfg
        if not str(out_dir).strip():
            raise UserError("--out is empty; name the run directory (an empty name would write into the current one)")
        self.out_dir = Path(out_dir)
        self.world, device = distributed.init_from_env(device)
        self.device = resolve_device(device)
        self.resume = resume
        self.force = force
        self.deterministic = deterministic
        self._lock: RunLock | None = None
        self._forced: list = []  # config changes accepted by --resume --force
        self._stored_config: dict | None = None
        if cfg.train.amp == "bf16" and self.device.type != "cuda":
            # bf16 matmuls on CPUs without native support die with SIGILL, not an exception.
            raise UserError("bf16 autocast runs on CUDA only; use amp: auto (bf16 on CUDA, off on CPU) or off", key="train.amp")
        use_amp = cfg.train.amp == "bf16" or (cfg.train.amp == "auto" and self.device.type == "cuda")
        self.autocast = (lambda: torch.autocast(self.device.type, dtype=torch.bfloat16)) if use_amp else nullcontext

    # ------------------------------------------------------------------ setup

    def _prepare_dir(self) -> None:
        """Lock OUT (rank 0), check it can take this run, and write ``config.yaml``.

        A fresh run never writes over a run's files; a resumed one may differ from the stored
        config only with ``--force``, never in its stream, and then the new config is written
        only once the checkpoint has loaded (:meth:`_accept_forced_config`).
        """
        out = self.out_dir
        if out.exists() and not out.is_dir():
            raise UserError(f"--out {out} is a file, not a directory; choose a directory for the run")
        if self.world.is_main:
            self._lock = RunLock(out)
        cfg_path = out / "config.yaml"
        resolved = self._resolved_config()
        if self.resume:
            if not cfg_path.is_file():
                raise UserError(f"--resume: {out} holds no run (no config.yaml); drop --resume to start one")
            self._stored_config = read_yaml(cfg_path)
            changes = config_changes(self._stored_config, resolved)
            if changes and not self.force:
                raise UserError(f"--resume: the config differs from the stored run ({format_changes(changes)}); "
                                f"pass --force to resume anyway")
            fixed = fixed_changes(changes)
            if fixed:
                raise UserError(f"--resume: the stored checkpoints belong to another stream ({format_changes(fixed)}); "
                                f"not even --force changes that: start a new run with another --out")
            self._forced = changes
        else:
            found = run_files(out)
            if found:
                raise UserError(f"{out} already holds a run ({', '.join(found)}); pass --resume to continue it "
                                f"or choose another --out")
        self.world.barrier()  # every rank has checked the directory before rank 0 writes to it
        if self.world.is_main and not self._forced:
            _write_atomic(cfg_path, yaml.safe_dump(resolved, sort_keys=False))
        self.world.barrier()

    def _resolved_config(self) -> dict:
        """The config as run: every default filled in, and ``out`` the directory actually written."""
        return {**self.cfg.to_dict(), "out": str(self.out_dir)}

    def _accept_forced_config(self, log: RunLogger) -> None:
        """After a ``--resume --force`` loaded its checkpoint: record the changes, then store the new config."""
        if not self._forced or not self.world.is_main:
            return
        log.event("config_forced", changes=[{"key": k, "stored": a, "now": b} for k, a, b in self._forced],
                  previous=self._stored_config)
        log.print(f"resumed with a changed config (--force): {format_changes(self._forced)}")
        _write_atomic(self.out_dir / "config.yaml", yaml.safe_dump(self._resolved_config(), sort_keys=False))

    def check(self) -> None:
        """Build everything a run needs (its data, the backbone with its weights, the strategy, the
        checks across sections) without training or writing anything: what ``clpeft validate`` does.

        Raises:
            UserError: what ``run`` would stop on before training.
        """
        self._build()

    def _build(self) -> tuple[list[Experience], Strategy]:
        cfg = self.cfg
        seed_everything(cfg.seed)
        scenario = cfg.scenario.build(seed=cfg.seed)
        stream = scenario.experiences()
        if not stream:
            raise UserError("the scenario produced no experiences", key="scenario")
        for exp in stream:
            exp.stream_length = len(stream)
        self.scenario = scenario
        if self.world.active and scenario.kind == "test_time_adaptation":
            raise UserError("test-time adaptation adapts online, batch after batch, in one process; "
                            "run it without torchrun", key="scenario.name")
        backbone = cfg.backbone.build(input_shape=scenario.input_shape)
        strategy = cfg.strategy.build(backbone=backbone)
        supported = strategy.supported_scenarios
        if supported is not None and scenario.kind not in supported:
            raise UserError(
                f"strategy '{cfg.strategy.name}' supports {list(supported)} scenarios, not '{scenario.kind}'",
                key="strategy.name",
            )
        strategy.to(self.device)
        if cfg.train.compile and self.device.type == "cuda":
            backbone.forward_features = torch.compile(backbone.forward_features)
        if strategy.needs_query and not backbone.frozen:
            raise UserError(
                f"strategy '{cfg.strategy.name}' keys on the frozen backbone's features; set backbone.freeze: true",
                key="backbone.freeze",
            )
        factory = None
        if cfg.train.feature_cache != "off":
            directory = cache_root() if cfg.train.feature_cache == "disk" else None
            if directory is not None and self.world.active:  # ranks never write the same memory-mapped file
                directory = directory / f"rank{self.world.rank}"

            def factory():
                return FeatureCache(backbone, self.device, cfg.eval.batch_size, directory, self.autocast)

        self.augment = self._build_augment(scenario, backbone)
        self.data = DataAccess(self.device, None, backbone, cfg.train.batch_size, cfg.train.num_workers, self.autocast,
                               cache_factory=factory, world=self.world)
        strategy.attach(self.data)
        return stream, strategy

    def _build_augment(self, scenario, backbone):
        """``train.augment`` as a batch function (None when off); images only, sized for the backbone."""
        spec = self.cfg.train.augment
        if spec == "none":
            return None
        shape = tuple(scenario.input_shape)
        if len(shape) < 2:
            raise UserError(f"train.augment transforms images, but this scenario's inputs have shape {shape}; "
                            f"use augment: none", key="train.augment")
        size = getattr(getattr(backbone, "preprocess", None), "size", None) or shape[-1]
        return build_augment(spec, size)

    # ------------------------------------------------------------------ the loop

    def run(self) -> dict:
        """Run (or resume) the experiment; returns the content of ``metrics.json``."""
        previous = torch.are_deterministic_algorithms_enabled()
        if self.deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True)
        try:
            self._prepare_dir()
            stream, strategy = self._build()
            if self.world.is_main:
                self.scenario.save_artifacts(self.out_dir)
            log = RunLogger(self.out_dir, self.cfg.logging.tensorboard, self.cfg.logging.progress, enabled=self.world.is_main,
                            wandb=self.cfg.logging.wandb, config=self._resolved_config())
            if self.augment is not None and strategy.backbone.frozen:
                log.print(f"train.augment: {self.cfg.train.augment}; augmented training batches compute their features "
                          f"every step (the feature cache serves evaluation only)")
            try:
                return self._run(stream, strategy, log)
            finally:
                log.close()
        finally:
            torch.use_deterministic_algorithms(previous)
            if self._lock is not None:
                self._lock.release()

    def _run(self, stream: list[Experience], strategy: Strategy, log: RunLogger) -> dict:
        if self.scenario.kind == "test_time_adaptation":
            return self._run_tta(stream, strategy, log)
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
                    raise UserError(f"{path} was taken after experience {state['experience']} of a stream with "
                                    f"{len(state['rows'][-1]) if state['rows'] else '?'} experiences; this one has {T}")
                self._load_strategy(strategy, state["strategy"], source=path)
                rows, timing, baseline = state["rows"], state["timing"], state["baseline"]
                start = state["experience"] + 1
                log.event("resumed", checkpoint=path.name, next_experience=start)
                log.print(f"resumed from {path.name}: continuing at experience {start}/{T}")
            self._accept_forced_config(log)
        log.event("run_start", experiences=T, device=str(self.device), strategy=self.cfg.strategy.name,
                  parameters=strategy.count_parameters())
        if start == 0 and self.cfg.eval.baseline:
            baseline = self._baseline(strategy, stream)
            log.event("baseline", accuracy=baseline)
        for exp in stream[start:]:
            seed_everything(derive_seed(self.cfg.seed, exp.index))
            train_s, n_samples = self._train_experience(strategy, exp, log)
            t0 = time.perf_counter()
            strategy.before_evaluation(exp)
            row = self._evaluate(strategy, stream)
            strategy.after_evaluation(exp, row)
            eval_s = time.perf_counter() - t0
            rows.append(row)
            timing.append({
                "experience": exp.index, "train_s": train_s, "eval_s": eval_s,
                "train_samples_per_s": n_samples / train_s if train_s > 0 else None,
                "peak_memory_mb": _peak_memory_mb(self.device),
            })
            seen = float(np.average(row[: exp.index + 1], weights=[len(e.test) for e in stream[: exp.index + 1]]))
            log.event("experience_end", step=exp.index, acc_seen=seen, row=row, **{f"acc_exp{j}": a for j, a in enumerate(row)})
            log.print(f"experience {exp.index + 1}/{T}: acc on seen = {seen:.4f}  row = [{', '.join(f'{a:.3f}' for a in row)}]")
            distributed.check_consistent(self.world, strategy, f"experience {exp.index}")
            if self.world.is_main:
                checkpoint.save(self.out_dir / "checkpoints", exp.index, {
                    "experience": exp.index, "strategy": strategy.state_dict(), "rows": rows,
                    "timing": timing, "baseline": baseline, "config": self._resolved_config(),
                }, keep=self.cfg.logging.keep_checkpoints)
        return self._finish(rows, timing, baseline, stream, strategy, log)

    # ------------------------------------------------------------------ test-time adaptation

    def _run_tta(self, stream: list[Experience], strategy: Strategy, log: RunLogger) -> dict:
        """Source phase, then online adaptation domain by domain (see the module docstring)."""
        scenario = self.scenario
        classes = list(range(len(scenario.class_names)))
        source_exp = Experience(0, scenario.source, None, classes, classes, domain="source")
        facing = [source_exp]  # what the strategy's hooks see: no test data, so no labels
        for exp in stream:
            facing.append(dataclasses.replace(exp, test=None, past=tuple(facing)))
        ckpt_dir, source_dir = self.out_dir / "checkpoints", self.out_dir / "source"
        log.event("run_start", experiences=len(stream), device=str(self.device), strategy=self.cfg.strategy.name,
                  parameters=strategy.count_parameters())
        found = self._load_latest(ckpt_dir, log, _TTA_KEYS) if self.resume else None
        needs_source = found is None or scenario.reset_each_domain
        source = self._load_latest(source_dir, log, _SOURCE_KEYS) if self.resume and needs_source else None
        if found is not None:
            state = found[1]
            if state["experience"] > len(stream):
                raise UserError(f"{found[0]} was taken after domain {state['experience']}; this stream has {len(stream)}")
            self._load_strategy(strategy, state["strategy"], source=found[0])
            correct, counts, timing = state["correct"], state["counts"], state["timing"]
            start = state["experience"] + 1
            log.event("resumed", checkpoint=found[0].name, next_experience=start)
            log.print(f"resumed from {found[0].name}: continuing at domain {start}/{len(stream)}")
        elif source is not None:  # killed after the source phase, before the first domain ended
            self._load_strategy(strategy, source[1]["strategy"], source=source[0])
            correct, counts, timing, start = [], [], source[1]["timing"], 1
        else:
            correct, counts, start = [], [], 1
            timing = self._source_phase(strategy, source_exp, log)
            checkpoint.save(source_dir, 0, {"experience": 0, "strategy": strategy.state_dict(), "timing": timing,
                                            "config": self._resolved_config()}, keep=1)
        if self.resume:
            self._accept_forced_config(log)
        source_state = None
        if scenario.reset_each_domain:  # the saved source state, read once (a copy the adaptation cannot touch)
            source_state = (source or self._load_latest(source_dir, log, _SOURCE_KEYS))[1]["strategy"]
        for exp, scored in zip(facing[start:], stream[start - 1:]):
            seed_everything(derive_seed(self.cfg.seed, exp.index))
            if source_state is not None:
                self._load_strategy(strategy, source_state)
            scorer, seconds, n_batches = self._adapt_domain(strategy, exp, scored.test)
            correct.append(scorer.correct)
            counts.append(scorer.count)
            timing.append({"experience": exp.index, "domain": exp.domain, "adapt_s": seconds, "batches": n_batches,
                           "samples_per_s": scorer.count / seconds if seconds > 0 else None,
                           "peak_memory_mb": _peak_memory_mb(self.device)})
            error = 1.0 - scorer.correct / scorer.count
            log.event("domain_end", step=exp.index, domain=exp.domain, error=error, accuracy=1.0 - error)
            log.print(f"domain {exp.index}/{len(stream)} ({exp.domain}): online error = {error:.4f}")
            checkpoint.save(ckpt_dir, exp.index, {
                "experience": exp.index, "strategy": strategy.state_dict(), "correct": correct, "counts": counts,
                "timing": timing, "config": self._resolved_config(),
            }, keep=self.cfg.logging.keep_checkpoints)
        return self._finish_tta(correct, counts, timing, stream, strategy, log)

    @staticmethod
    def _load_latest(directory: Path, log: RunLogger, required: tuple[str, ...]) -> tuple[Path, dict] | None:
        """The newest good checkpoint holding ``required``; every skipped one is logged and printed with the reason."""

        def skipped(path: Path, reason: str) -> None:
            log.event("checkpoint_skipped", file=str(path), reason=reason)
            log.print(f"skipped checkpoint {path.name}: {reason}; using an earlier one")

        return checkpoint.load_latest(directory, on_skip=skipped, required=required)

    def _source_phase(self, strategy: Strategy, source_exp: Experience, log: RunLogger) -> list[dict]:
        """Train the source model on clean data (experience 0), or load ``source_checkpoint``."""
        path = self.scenario.source_checkpoint
        if path is not None:
            self._load_strategy(strategy, _read_source_checkpoint(Path(path).expanduser()), partial=True)
            log.event("source_loaded", path=str(path))
            return [{"experience": 0, "domain": "source", "train_s": 0.0, "peak_memory_mb": _peak_memory_mb(self.device)}]
        seed_everything(derive_seed(self.cfg.seed, 0))
        train_s, n_samples = self._train_experience(strategy, source_exp, log)
        log.event("source_trained", step=0, train_s=train_s)
        return [{"experience": 0, "domain": "source", "train_s": train_s,
                 "train_samples_per_s": n_samples / train_s if train_s > 0 else None,
                 "peak_memory_mb": _peak_memory_mb(self.device)}]

    def _adapt_domain(self, strategy: Strategy, exp: Experience, view: DataView) -> tuple[OnlineScorer, float, int]:
        """One domain: ``adapt`` on every unlabeled batch in order, each prediction scored online."""
        t0 = time.perf_counter()
        strategy.eval()
        strategy.before_experience(exp)
        strategy.refresh_input_mode()
        strategy.to(self.device)
        scorer = OnlineScorer(view, self.device)
        batch_size = self.cfg.train.batch_size
        n_batches = 0
        with _out_of_memory_hint(f"adapting to domain {exp.index} ({exp.domain})", "train.batch_size", batch_size):
            for x in self.data.inputs(view, batch_size, uses_features=strategy.uses_features):
                with torch.enable_grad(), self.autocast():
                    logits = strategy.adapt(x)
                scorer.update(logits.detach())
                n_batches += 1
        strategy.after_experience(exp)
        return scorer, time.perf_counter() - t0, n_batches

    def _load_strategy(self, strategy: Strategy, state: dict, partial: bool = False, source: Path | None = None) -> None:
        """Load a state (a checkpoint's, or the source's for a reset); ``partial`` accepts a state
        saved by another strategy (a source model trained with ``finetune``) as long as it holds
        the backbone and head. A ``source`` checkpoint that does not fit is a :class:`UserError`."""
        if partial:
            key = "scenario.source_checkpoint"
            try:
                missing, unused = strategy.load_state_dict(state, strict=False)
            except RuntimeError as exc:
                raise UserError(f"it does not fit this backbone ({str(exc).splitlines()[1].strip()})", key=key) from None
            needed = [k for k in missing if k.startswith(("backbone.", "head."))]
            if needed:
                raise UserError(f"it lacks {needed[:3]}{'...' if len(needed) > 3 else ''}; it must come from a run with "
                                f"the same backbone", key=key)
            foreign = [k for k in unused if k.startswith("backbone.")]
            if foreign:  # e.g. a LoRA source's adapters: the backbone would run without them
                raise UserError(f"its backbone holds {foreign[:3]}{'...' if len(foreign) > 3 else ''}, which this backbone "
                                f"has no place for; it must come from a run with the same backbone settings", key=key)
        else:
            try:
                strategy.load_state_dict(state)
            except (RuntimeError, KeyError, TypeError, ValueError) as exc:
                first = str(exc).strip().splitlines()[-1].strip() if str(exc).strip() else type(exc).__name__
                raise UserError(f"{source or 'the saved state'} does not fit the configured strategy ({first[:300]}); "
                                f"resume with the config the run was started with") from None
        strategy.refresh_input_mode()
        strategy.to(self.device)

    def _finish_tta(self, correct, counts, timing, stream, strategy: Strategy, log: RunLogger) -> dict:
        summary = metrics.tta_summary(correct, counts)
        adapt = [t for t in timing if "adapt_s" in t]
        adapt_s = sum(t["adapt_s"] for t in adapt)
        result = {
            "acc_matrix": [[c / n for c, n in zip(correct, counts)]],
            "test_sizes": list(counts),
            "domains": [e.domain for e in stream],
            "baseline": None,
            "metrics": summary,
            "timing": {
                "experiences": timing,
                "train_s": timing[0].get("train_s", 0.0),
                "eval_s": adapt_s,
                "s_per_batch": adapt_s / max(sum(t["batches"] for t in adapt), 1),
                "peak_memory_mb": max(t["peak_memory_mb"] for t in timing),
            },
            "parameters": strategy.count_parameters(),
            "provenance": provenance(self.device),
            "class_names": self.scenario.class_names,
        }
        self._write_result(result, strategy, log)
        return result

    def _write_result(self, result: dict, strategy: Strategy, log: RunLogger) -> None:
        """``metrics.json`` (atomically), the final weights, and the scalar metrics as an event (rank 0)."""
        if not self.world.is_main:
            return
        _write_atomic(self.out_dir / "metrics.json", json.dumps(result, indent=2))
        export_weights(strategy, self.out_dir / "model.safetensors")
        log.event("metrics", **{k: v for k, v in result["metrics"].items() if not isinstance(v, list)})
        log.hparams(self.cfg.to_dict(), result["metrics"])

    def _train_experience(self, strategy: Strategy, exp: Experience, log: RunLogger) -> tuple[float, int]:
        train = self.cfg.train
        t0 = time.perf_counter()
        strategy.eval().to(self.device)  # hooks run in eval mode on the device (they may compute features)
        strategy.before_experience(exp)
        strategy.refresh_input_mode()
        strategy.to(self.device)  # what before_experience added
        data = strategy.train_data(exp)
        optimizer = make_optimizer(strategy.param_groups(train.lr), train)
        named = dict(strategy.named_parameters())  # what after_training_step may replace
        order = torch.Generator().manual_seed(derive_seed(self.cfg.seed, exp.index, "order"))
        full, partial = divmod(len(data), train.batch_size) if optimizer else (0, 0)
        steps_per_epoch = full + (1 if partial and not train.drop_last else 0)
        n_steps = train.epochs * steps_per_epoch
        step_fn = training_step_fn(strategy, self.world) if n_steps else None
        if self.world.active:  # independent dropout/augmentation draws per rank (re-synchronised below)
            seed_everything(derive_seed(self.cfg.seed, exp.index, "rank", self.world.rank))
        scheduler = make_scheduler(optimizer, train, steps_per_epoch) if n_steps else None
        if 0 < n_steps < FEW_STEPS:
            log.event("few_steps", step=exp.index, steps=n_steps)
            log.print(f"warning: experience {exp.index} trains for only {n_steps} optimizer steps ({train.epochs} epoch(s) "
                      f"x {steps_per_epoch} batches of {train.batch_size}); its numbers may be those of a barely trained "
                      f"model: raise train.epochs or lower train.batch_size")
        bar = log.progress(n_steps, f"experience {exp.index + 1}")
        step = 0
        with _out_of_memory_hint(f"training on experience {exp.index}", "train.batch_size", train.batch_size):
            for epoch in range(train.epochs if n_steps else 0):
                strategy.train()
                strategy.epoch = epoch
                strategy.before_epoch(exp, epoch)
                total, count = 0.0, 0
                global_sizes = torch.arange(len(data)).split(train.batch_size)[:steps_per_epoch]
                batches = self.data.batches(data, train.batch_size, shuffle=True, generator=order, shard=True,
                                            uses_features=strategy.uses_features, with_query=strategy.needs_query,
                                            augment=self.augment)
                for chunk, batch in zip(global_sizes, batches):  # global_sizes first: a dropped batch is never loaded
                    with self.autocast():
                        loss, value, n = step_fn(batch, len(chunk))
                    if not math.isfinite(value):
                        raise RunError(
                            f"non-finite loss ({value}) at experience {exp.index}, epoch {epoch}, step {step}; "
                            f"lower train.lr or check the data (checkpoints of earlier experiences are kept)"
                        )
                    optimizer_step(optimizer, loss, train.clip_grad, strategy.after_backward)
                    if scheduler is not None:
                        scheduler.step()
                    if strategy.after_training_step():  # parameters replaced (a LoRA rank grown)
                        named, step_fn = carry_over(strategy, optimizer, named, self.world)
                    total += value * n
                    count += n
                    step += 1
                    bar.update(1)
                log.event("train_epoch", step=exp.index * train.epochs + epoch, experience=exp.index, epoch=epoch, loss=total / max(count, 1))
                strategy.after_epoch(exp, epoch)
        bar.close()
        strategy.eval()
        self._synchronize(strategy)
        seed_everything(derive_seed(self.cfg.seed, exp.index, "after"))  # the same random state on every rank
        strategy.after_experience(exp)
        return time.perf_counter() - t0, train.epochs * len(data) if n_steps else 0

    def _synchronize(self, strategy: Strategy) -> None:
        """Combine what training accumulated from local batches (see :mod:`clpeft.distributed`):
        components' own statistics (``synchronize(world)``), then rank 0's buffers."""
        for module in strategy.modules():
            if module is not strategy and callable(getattr(module, "synchronize", None)):
                module.synchronize(self.world)
        distributed.broadcast_buffers(self.world, strategy)

    @torch.no_grad()
    def _correct(self, strategy: Strategy, view: DataView) -> int:
        """Correct predictions on this rank's share of ``view``."""
        correct = 0
        for batch in self.data.batches(view, self.cfg.eval.batch_size, uses_features=strategy.uses_features,
                                       with_query=strategy.needs_query, shard=True):
            if len(batch.y) == 0:
                continue
            with self.autocast():
                logits = strategy.predict(batch.x, query=batch.features) if batch.features is not None else strategy.predict(batch.x)
            if logits.shape[1] == 0:
                continue
            correct += int((logits.argmax(dim=1) == batch.y).sum())
        return correct

    def _evaluate(self, strategy: Strategy, stream: list[Experience]) -> list[float]:
        """Accuracy on every experience's test set (each rank scores its share; counts all-reduced)."""
        strategy.eval()
        self.data.refresh_cache(strategy.uses_features or strategy.needs_query, rekey=False)
        with _out_of_memory_hint("evaluating", "eval.batch_size", self.cfg.eval.batch_size):
            correct = torch.tensor([self._correct(strategy, e.test) for e in stream], dtype=torch.float64)
        self.world.all_reduce_sum(correct)
        return [c / len(e.test) for c, e in zip(correct.tolist(), stream)]

    def _baseline(self, strategy: Strategy, stream: list[Experience]) -> list[float]:
        """Accuracy before any training: a copy of the strategy whose head is grown to every class.

        GEM's ``b`` (Lopez-Paz & Ranzato, 2017) is the accuracy of the model at random
        initialisation; the copy sees only ``before_experience`` for each experience (no data).
        The head is grown from a seed of its own, so methods that build the same head from the
        same seed share one baseline, whatever their constructors drew before.
        """
        rng = torch.get_rng_state()
        torch.manual_seed(derive_seed(self.cfg.seed, "baseline"))
        fresh = _copy_strategy(strategy)
        for exp in stream:
            fresh.before_experience(exp)
        fresh.to(self.device)
        acc = self._evaluate(fresh, stream)
        torch.set_rng_state(rng)
        return acc

    def _finish(self, rows, timing, baseline, stream, strategy: Strategy, log: RunLogger) -> dict:
        sizes = [len(e.test) for e in stream]
        measurable = metrics.transfer_is_measurable([e.classes_in_this_experience for e in stream])
        summary = metrics.summarize(rows, sizes, baseline if measurable else None)
        if baseline is not None and not measurable:
            summary["fwt"] = None  # n/a: no experience's classes could be predicted before it was trained
        if self.scenario.kind == "few_shot_class_incremental":
            summary.update(metrics.few_shot_summary(rows, sizes))
            for i, acc in enumerate(summary["session_acc"]):
                novel = {} if i == 0 else {k: summary[k][i - 1] for k in ("base_acc", "novel_acc", "harmonic_mean")}
                log.event("session", step=i, acc=acc, **novel)
        result = {
            "acc_matrix": rows,
            "test_sizes": sizes,
            "baseline": baseline,
            "metrics": summary,
            "timing": {
                "experiences": timing,
                "train_s": sum(t["train_s"] for t in timing),
                "eval_s": sum(t["eval_s"] for t in timing),
                "peak_memory_mb": max(t["peak_memory_mb"] for t in timing),
            },
            "parameters": strategy.count_parameters(),
            "provenance": provenance(self.device),
            "class_names": getattr(self.scenario, "class_names", None),
        }
        self._write_result(result, strategy, log)
        if log.tensorboard:
            from clpeft.report import accuracy_matrix_figure

            log.figure("acc_matrix", accuracy_matrix_figure(rows), step=len(rows))
        return result


class _StepModule(nn.Module):
    """The strategy's ``training_step`` as a module's forward: what DistributedDataParallel wraps."""

    def __init__(self, strategy: Strategy):
        super().__init__()
        self.strategy = strategy

    def forward(self, batch, weight: float) -> torch.Tensor:
        if len(batch.y) == 0:  # an empty share of the last global batch: zero gradients to the all-reduce
            return sum(p.sum() for p in self.strategy.parameters() if p.requires_grad) * 0.0
        return self.strategy.training_step(batch) * weight


def training_step_fn(strategy: Strategy, world: distributed.World):
    """``step(batch, n_global) -> (loss to backpropagate, mean loss over the global batch, n_global)``.

    In one process this is ``training_step``. With several ranks the strategy runs under
    DistributedDataParallel (rebuilt per experience, since methods change what trains), the
    local loss is weighted by ``n_local * world / n_global`` so that DDP's gradient average is
    the global batch mean, and the reported loss is all-reduced.
    """
    if not world.active:

        def step(batch, n_global):
            loss = strategy.training_step(batch)
            return loss, loss.item(), len(batch.y)  # one device sync per step: the NaN check and the log
        return step
    # a strategy may train a different subset of its parameters at each step (the selected
    # prompts; LAE's frozen first epochs), hence the search for unused parameters
    ddp = nn.parallel.DistributedDataParallel(_StepModule(strategy), find_unused_parameters=True, **_ddp_options())

    def step(batch, n_global):
        n_local = len(batch.y)
        loss = ddp(batch, n_local * world.size / n_global)
        weighted = loss.detach().double() * n_global / world.size  # = local mean loss * n_local
        totals = world.all_reduce_sum(torch.stack([weighted.cpu(), torch.tensor(float(n_local), dtype=torch.float64)]))
        return loss, float(totals[0] / totals[1]), n_global
    return step


def carry_over(strategy: Strategy, optimizer: torch.optim.Optimizer, named: dict[str, nn.Parameter],
               world: distributed.World):
    """After ``after_training_step`` replaced parameters: hand them to ``optimizer`` with their
    predecessors' state and rebuild the step function (DDP's buckets follow the new parameters).

    Returns:
        (the named parameters now, the new step function).
    """
    current = dict(strategy.named_parameters())
    replace_parameters(optimizer, named, current)
    return current, training_step_fn(strategy, world)


def export_weights(strategy: Strategy, path: Path) -> Path:
    """Write the strategy's final tensors (parameters and buffers) as safetensors.

    This is what ``clpeft merge`` reads when given a run directory; names are the strategy's
    ``state_dict`` keys (``backbone.net.blocks.0.attn.qkv.weight``, ``head.weight``, ...).
    Non-tensor extra state (replay memories, statistics) stays in the checkpoints.
    """
    from safetensors.torch import save_file

    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in strategy.state_dict().items()
               if isinstance(v, torch.Tensor)}
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp), metadata={"format": "pt", "producer": "clpeft"})
    tmp.replace(path)
    return path


def _write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to a temporary file beside ``path``, then rename it into place."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def _read_source_checkpoint(path: Path) -> dict:
    """The strategy state in a checkpoint file, or in a run directory (its ``source/`` when it
    is a test-time-adaptation run, else the newest of its ``checkpoints/``)."""
    key = "scenario.source_checkpoint"
    if path.is_dir():
        for sub in ("source", "checkpoints"):
            found = checkpoint.load_latest(path / sub)
            if found is not None:
                return found[1]["strategy"]
        raise UserError(f"{path} holds no checkpoint (expected source/ or checkpoints/ of a clpeft run)", key=key)
    if not path.is_file():
        raise UserError(f"{path} not found: give a clpeft run directory or one of its checkpoints/exp_*.pt", key=key)
    payload, problem = checkpoint.read(path)
    if problem is not None:
        raise UserError(f"{path}: {problem}", key=key)
    if "strategy" not in payload:
        raise UserError(f"{path} is not a clpeft checkpoint of a run (it holds no strategy state)", key=key)
    return payload["strategy"]


def _copy_strategy(strategy: Strategy) -> Strategy:
    import copy

    data, strategy._data = strategy._data, None
    try:
        fresh = copy.deepcopy(strategy)
    finally:
        strategy._data = data
    fresh.attach(data)
    return fresh
