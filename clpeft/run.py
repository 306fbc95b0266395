"""A built run: its stream, strategy and data access, and the steps that train, evaluate and adapt.

:meth:`clpeft.engine.Engine.build` makes a :class:`Run` from a config without writing anything;
the engine drives it through the stream (checkpoints, logs, metrics), ``clpeft bench`` times
its phases, and a test or a notebook can step it directly::

    run = Engine(cfg, out_dir).build()
    for exp in run.stream:
        run.train_experience(exp, log)
        row = run.evaluate()

An experience trains in three phases, each callable on its own: :meth:`Run.prepare` (the
strategy's ``before_experience`` and ``train_data``), :meth:`Run.fit` (epochs of optimizer
steps) and :meth:`Run.conclude` (statistics combined across ranks, ``after_experience``).
"""

from __future__ import annotations

import copy
import math
import resource
import time
from collections.abc import Callable
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch

from clpeft import distributed, fsdp
from clpeft.augment import build_augment
from clpeft.config import RunConfig
from clpeft.data import DataView
from clpeft.data_access import DataAccess
from clpeft.errors import RunError, UserError
from clpeft.experience import Experience, Scenario
from clpeft.feature_cache import FeatureCache
from clpeft.logging import RunLogger
from clpeft.paths import cache_root
from clpeft.seeding import derive_seed, seed_everything
from clpeft.strategy import Strategy
from clpeft.training import (
    FEW_STEPS,
    carry_over,
    make_optimizer,
    make_scheduler,
    optimizer_step,
    out_of_memory_hint,
    training_step_fn,
)

__all__ = ["OnlineScorer", "Run", "build_run", "peak_memory_mb", "resolve_device"]


def resolve_device(device: str) -> torch.device:
    """``auto`` is CUDA when present; ``cuda`` without a GPU is a one-line error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available; use --device cpu or auto")
    return torch.device(device)


def peak_memory_mb(device: torch.device) -> float:
    """Peak GPU memory allocated, or the process's peak resident memory on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


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
            raise RunError(
                f"adapt returned logits of shape {tuple(logits.shape)} for a batch of {len(labels)} inputs; "
                f"it must return (batch, classes) logits, one row per input, in order"
            )
        self.correct += int((logits.argmax(dim=1) == labels).sum())
        self.count += len(labels)


@dataclass
class Run:
    """What a config builds: the stream and the strategy attached to its data (see the module docstring)."""

    cfg: RunConfig
    device: torch.device
    world: distributed.World
    scenario: Scenario
    stream: list[Experience]
    strategy: Strategy
    data: DataAccess
    augment: Callable[[torch.Tensor], torch.Tensor] | None = None
    autocast: Callable = field(default=nullcontext)

    # ------------------------------------------------------------------ training

    def train_experience(self, exp: Experience, log: RunLogger) -> tuple[float, int]:
        """Train on ``exp`` (all three phases); returns the seconds taken and the samples seen."""
        t0 = time.perf_counter()
        data = self.prepare(exp)
        n_samples = self.fit(exp, data, log)
        self.conclude(exp)
        return time.perf_counter() - t0, n_samples

    def prepare(self, exp: Experience) -> DataView:
        """``before_experience`` (in eval mode, on the device) and the data to train on."""
        strategy = self.strategy
        strategy.eval().to(self.device)  # hooks run in eval mode on the device (they may compute features)
        strategy.before_experience(exp)
        strategy.refresh_input_mode()
        strategy.to(self.device)  # what before_experience added
        return strategy.train_data(exp)

    def fit(
        self,
        exp: Experience,
        data: DataView,
        log: RunLogger,
        *,
        max_steps: int | None = None,
        on_step: Callable[[float, int], None] | None = None,
        after_step: Callable[[int], None] | None = None,
        warn_few_steps: bool = True,
    ) -> int:
        """The epochs of optimizer steps on ``data``; returns the training samples seen.

        ``max_steps`` stops early and ``on_step(seconds, samples)`` is told each step's duration
        (with a device sync on CUDA): ``clpeft bench`` times this loop, not a copy of it.
        ``after_step(samples)`` is told, after each step, the samples of ``data`` trained on so
        far in the experience (global batches; online evaluation points hang on it).
        ``warn_few_steps: False`` drops the few-steps warning (online chunks are short on purpose).
        """
        strategy, train = self.strategy, self.cfg.train
        optimizer = make_optimizer(strategy.param_groups(train.lr), train)
        named = dict(strategy.named_parameters())  # what after_training_step may replace
        order = torch.Generator().manual_seed(derive_seed(self.cfg.seed, exp.index, "order"))
        full, partial = divmod(len(data), train.batch_size) if optimizer else (0, 0)
        steps_per_epoch = full + (1 if partial and not train.drop_last else 0)
        n_steps = train.epochs * steps_per_epoch
        strategy.planned_steps = n_steps
        if not n_steps:
            return 0
        step_fn = training_step_fn(strategy, self.world)
        if self.world.active:  # independent dropout/augmentation draws per rank (re-synchronised below)
            seed_everything(derive_seed(self.cfg.seed, exp.index, "rank", self.world.rank))
        scheduler = make_scheduler(optimizer, train, steps_per_epoch)
        if n_steps < FEW_STEPS and warn_few_steps:
            log.event("few_steps", step=exp.index, steps=n_steps)
            log.print(
                f"warning: experience {exp.index} trains for only {n_steps} optimizer steps ({train.epochs} epoch(s) "
                f"x {steps_per_epoch} batches of {train.batch_size}); its numbers may be those of a barely trained "
                f"model: raise train.epochs or lower train.batch_size"
            )
        bar = log.progress(n_steps, f"experience {exp.index + 1}")
        step = trained = 0
        with out_of_memory_hint(f"training on experience {exp.index}", "train.batch_size", train.batch_size):
            for epoch in range(train.epochs):
                strategy.train()
                strategy.epoch = epoch
                strategy.before_epoch(exp, epoch)
                total, count = 0.0, 0
                global_sizes = torch.arange(len(data)).split(train.batch_size)[:steps_per_epoch]
                batches = self.data.batches(
                    data,
                    train.batch_size,
                    shuffle=True,
                    generator=order,
                    shard=True,
                    uses_features=strategy.uses_features,
                    with_query=strategy.needs_query,
                    augment=self.augment,
                )
                for chunk, batch in zip(global_sizes, batches):  # global_sizes first: a dropped batch is never loaded
                    t0 = self._clock() if on_step else 0.0
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
                    if on_step:
                        on_step(self._clock() - t0, len(batch.y))
                    trained += len(chunk)
                    if after_step:
                        after_step(trained)
                    total += value * n
                    count += n
                    step += 1
                    bar.update(1)
                    if step == max_steps:
                        break
                log.event(
                    "train_epoch", step=exp.index * train.epochs + epoch, experience=exp.index, epoch=epoch, loss=total / max(count, 1)
                )
                strategy.after_epoch(exp, epoch)
                if step == max_steps:
                    break
        bar.close()
        return train.epochs * len(data)

    def conclude(self, exp: Experience) -> None:
        """After the epochs: statistics combined across ranks, the same random state everywhere, ``after_experience``."""
        self.strategy.eval()
        self.synchronize()
        seed_everything(derive_seed(self.cfg.seed, exp.index, "after"))  # the same random state on every rank
        self.strategy.after_experience(exp)

    def synchronize(self) -> None:
        """Combine what training accumulated from local batches (see :mod:`clpeft.distributed`):
        components' own statistics (``synchronize(world)``), then rank 0's buffers."""
        for module in self.strategy.modules():
            if module is not self.strategy and callable(getattr(module, "synchronize", None)):
                module.synchronize(self.world)
        distributed.broadcast_buffers(self.world, self.strategy)

    # ------------------------------------------------------------------ evaluation

    def evaluate(self, strategy: Strategy | None = None, confusion: torch.Tensor | None = None) -> list[float]:
        """Accuracy on every experience's test set (each rank scores its share; counts all-reduced).

        ``confusion``, a ``(C, C)`` float64 tensor of zeros (:meth:`n_classes`), receives in the
        same pass the count of each (true class, predicted class) pair over all the test sets.
        """
        strategy = strategy or self.strategy
        strategy.eval()
        self.data.refresh_cache(strategy.uses_features or strategy.needs_query, rekey=False)
        with out_of_memory_hint("evaluating", "eval.batch_size", self.cfg.eval.batch_size):
            correct = torch.tensor([self.correct(e.test, strategy, confusion) for e in self.stream], dtype=torch.float64)
        self.world.all_reduce_sum(correct)
        if confusion is not None:
            self.world.all_reduce_sum(confusion)
        return [c / len(e.test) for c, e in zip(correct.tolist(), self.stream)]

    @property
    def n_classes(self) -> int:
        """The number of classes in the stream (labels are ``0..n_classes-1``)."""
        return 1 + max(c for e in self.stream for c in e.classes_seen_so_far)

    def cache_seconds(self) -> float:
        """Seconds the feature cache has spent computing features so far (0 without one)."""
        return self.data.cache.seconds if self.data.cache is not None else 0.0

    def accuracy(self, view: DataView) -> float:
        """Accuracy on ``view`` (each rank scores its share; counts all-reduced)."""
        self.strategy.eval()
        self.data.refresh_cache(self.strategy.uses_features or self.strategy.needs_query, rekey=False)
        with out_of_memory_hint("evaluating", "eval.batch_size", self.cfg.eval.batch_size):
            correct = torch.tensor([float(self.correct(view))], dtype=torch.float64)
        self.world.all_reduce_sum(correct)
        return float(correct[0]) / len(view) if len(view) else 0.0

    @contextmanager
    def training_paused(self):
        """Evaluate between two optimizer steps: the random state and every module's train/eval
        mode are restored afterwards, so the pause leaves training exactly as it was."""
        modes = [(module, module.training) for module in self.strategy.modules()]
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            try:
                yield
            finally:
                for module, training in modes:
                    module.training = training

    @property
    def scores_itself(self) -> bool:
        """Whether the strategy scores its own outputs (:meth:`correct`): no classes predicted, no confusion."""
        return callable(getattr(self.strategy, "score", None))

    @torch.no_grad()
    def correct(self, view: DataView, strategy: Strategy | None = None, confusion: torch.Tensor | None = None) -> float:
        """Correct predictions on this rank's share of ``view``; ``confusion[true, predicted]`` counts
        them when given (a prediction outside its columns, which no head makes, is left out).

        A strategy with a ``score(batch)`` method scores its own outputs instead (generated text,
        say): it returns one score in [0, 1] per sample, and their sum counts as the correct
        predictions (so the accuracy is the mean score); ``confusion`` is then left untouched.
        """
        strategy = strategy or self.strategy
        scorer = getattr(strategy, "score", None)
        batches = self.data.batches(
            view, self.cfg.eval.batch_size, uses_features=strategy.uses_features, with_query=strategy.needs_query, shard=True
        )
        with fsdp.lockstep(strategy):  # a sharded net: every rank runs as many forwards as the busiest
            return self._correct(batches, strategy, scorer, confusion)

    def _correct(self, batches, strategy: Strategy, scorer, confusion: torch.Tensor | None) -> float:
        """:meth:`correct` over this rank's ``batches``."""
        correct = 0
        for batch in batches:
            if len(batch.y) == 0:
                continue
            if callable(scorer):
                with self.autocast():
                    correct += float(scorer(batch).double().sum())
                continue
            with self.autocast():
                logits = strategy.predict(batch.x, query=batch.features) if batch.features is not None else strategy.predict(batch.x)
            if logits.shape[1] == 0:
                continue
            predicted = logits.argmax(dim=1)
            correct += int((predicted == batch.y).sum())
            if confusion is not None:
                inside = predicted < confusion.shape[1]
                pairs = (batch.y[inside].cpu(), predicted[inside].cpu())
                confusion.index_put_(pairs, torch.ones(len(pairs[0]), dtype=confusion.dtype), accumulate=True)
        return correct

    def baseline(self) -> list[float]:
        """Accuracy before any training: a copy of the strategy whose head is grown to every class.

        GEM's ``b`` (Lopez-Paz & Ranzato, 2017) is the accuracy of the model at random
        initialisation; the copy sees only ``before_experience`` for each experience (no data).
        The head is grown from a seed of its own, so methods that build the same head from the
        same seed share one baseline, whatever their constructors drew before.
        """
        rng = torch.get_rng_state()
        torch.manual_seed(derive_seed(self.cfg.seed, "baseline"))
        fresh = _copy_strategy(self.strategy)
        for exp in self.stream:
            fresh.before_experience(exp)
        fresh.to(self.device)
        acc = self.evaluate(fresh)
        torch.set_rng_state(rng)
        return acc

    # ------------------------------------------------------------------ test-time adaptation

    def adapt_domain(self, exp: Experience, view: DataView) -> tuple[OnlineScorer, float, int]:
        """One domain: ``adapt`` on every unlabeled batch in order, each prediction scored online."""
        strategy = self.strategy
        t0 = time.perf_counter()
        strategy.eval()
        strategy.before_experience(exp)
        strategy.refresh_input_mode()
        strategy.to(self.device)
        scorer = OnlineScorer(view, self.device)
        batch_size = self.cfg.train.batch_size
        n_batches = 0
        with out_of_memory_hint(f"adapting to domain {exp.index} ({exp.domain})", "train.batch_size", batch_size):
            for x in self.data.inputs(view, batch_size, uses_features=strategy.uses_features):
                with torch.enable_grad(), self.autocast():
                    logits = strategy.adapt(x)
                scorer.update(logits.detach())
                n_batches += 1
        strategy.after_experience(exp)
        return scorer, time.perf_counter() - t0, n_batches

    # ------------------------------------------------------------------ states

    def load_strategy(self, state: dict, partial: bool = False, source: Path | None = None) -> None:
        """Load a state (a checkpoint's, or the source's for a reset); ``partial`` accepts a state
        saved by another strategy (a source model trained with ``finetune``) as long as it holds
        the backbone and head. A ``source`` checkpoint that does not fit is a :class:`UserError`."""
        strategy = self.strategy
        if partial:
            key = "scenario.source_checkpoint"
            try:
                missing, unused = strategy.load_state_dict(state, strict=False)
            except RuntimeError as exc:
                raise UserError(f"it does not fit this backbone ({str(exc).splitlines()[1].strip()})", key=key) from None
            needed = [k for k in missing if k.startswith(("backbone.", "head."))]
            if needed:
                raise UserError(
                    f"it lacks {needed[:3]}{'...' if len(needed) > 3 else ''}; it must come from a run with the same backbone", key=key
                )
            foreign = [k for k in unused if k.startswith("backbone.")]
            if foreign:  # e.g. a LoRA source's adapters: the backbone would run without them
                raise UserError(
                    f"its backbone holds {foreign[:3]}{'...' if len(foreign) > 3 else ''}, which this backbone "
                    f"has no place for; it must come from a run with the same backbone settings",
                    key=key,
                )
        else:
            try:
                strategy.load_state_dict(state)
            except (RuntimeError, KeyError, TypeError, ValueError) as exc:
                first = str(exc).strip().splitlines()[-1].strip() if str(exc).strip() else type(exc).__name__
                raise UserError(
                    f"{source or 'the saved state'} does not fit the configured strategy ({first[:300]}); "
                    f"resume with the config the run was started with"
                ) from None
        strategy.refresh_input_mode()
        strategy.to(self.device)

    def _clock(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()


def build_run(cfg: RunConfig, device: torch.device, world: distributed.World, autocast: Callable) -> Run:
    """Build the stream, backbone and strategy of ``cfg`` and attach the strategy to its data.

    Raises:
        UserError: what a run would stop on before training (data, weights, cross-section checks).
    """
    seed_everything(cfg.seed)
    scenario = cfg.scenario.build(seed=cfg.seed)
    stream = scenario.experiences()
    if not stream:
        raise UserError("the scenario produced no experiences", key="scenario")
    classes = sorted({c for exp in stream for c in exp.classes_in_this_experience})
    for exp in stream:
        exp.stream_length, exp.classes_in_stream = len(stream), classes
    if world.active and scenario.kind == "test_time_adaptation":
        raise UserError(
            "test-time adaptation adapts online, batch after batch, in one process; run it without torchrun", key="scenario.name"
        )
    if scenario.online is not None:
        _check_online(cfg, world)
    backbone = cfg.backbone.build(input_shape=scenario.input_shape)
    strategy = cfg.strategy.build(backbone=backbone)
    supported = strategy.supported_scenarios
    if supported is not None and scenario.kind not in supported:
        raise UserError(f"strategy '{cfg.strategy.name}' supports {list(supported)} scenarios, not '{scenario.kind}'", key="strategy.name")
    fsdp.shard(strategy, world, cfg, device)  # before the move: each GPU receives its shards alone
    strategy.to(device)
    if cfg.train.compile and device.type == "cuda":
        backbone.forward_features = torch.compile(backbone.forward_features)
    if strategy.needs_query and not backbone.frozen:
        raise UserError(
            f"strategy '{cfg.strategy.name}' keys on the frozen backbone's features; set backbone.freeze: true", key="backbone.freeze"
        )
    data = DataAccess(
        device,
        None,
        backbone,
        cfg.train.batch_size,
        cfg.train.num_workers,
        autocast,
        cache_factory=_cache_factory(cfg, backbone, device, world, autocast),
        world=world,
    )
    strategy.attach(data)
    return Run(cfg, device, world, scenario, stream, strategy, data, _augment(cfg, scenario, backbone), autocast)


def _check_online(cfg: RunConfig, world: distributed.World) -> None:
    """An online stream is learned in one pass, in one process."""
    if cfg.train.epochs != 1:
        raise UserError(f"scenario.online learns each sample once: set train.epochs: 1 (got {cfg.train.epochs})", key="train.epochs")
    if cfg.train.drop_last:
        raise UserError("scenario.online learns every sample: set train.drop_last: false", key="train.drop_last")
    if world.active:
        raise UserError("online streams evaluate between optimizer steps in one process; run them without torchrun", key="scenario.online")


def _cache_factory(cfg: RunConfig, backbone, device: torch.device, world: distributed.World, autocast):
    """How the feature cache is made when first needed (None when ``train.feature_cache: off``)."""
    if cfg.train.feature_cache == "off":
        return None
    directory = cache_root() if cfg.train.feature_cache == "disk" else None
    if directory is not None and world.active:  # ranks never write the same memory-mapped file
        directory = directory / f"rank{world.rank}"
    return lambda: FeatureCache(backbone, device, cfg.eval.batch_size, directory, autocast)


def _augment(cfg: RunConfig, scenario: Scenario, backbone):
    """``train.augment`` as a batch function (None when off); images only, sized for the backbone."""
    spec = cfg.train.augment
    if spec == "none":
        return None
    shape = tuple(scenario.input_shape)
    if len(shape) < 2:
        raise UserError(
            f"train.augment transforms images, but this scenario's inputs have shape {shape}; use augment: none", key="train.augment"
        )
    size = getattr(getattr(backbone, "preprocess", None), "size", None) or shape[-1]
    return build_augment(spec, size)


def _copy_strategy(strategy: Strategy) -> Strategy:
    data, strategy._data = strategy._data, None
    experience, strategy.experience = strategy.experience, None  # the stream's data is not copied
    try:
        fresh = copy.deepcopy(strategy)
    finally:
        strategy._data, strategy.experience = data, experience
    fresh.attach(data)
    return fresh
