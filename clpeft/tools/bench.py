"""``clpeft bench CONFIG``: how fast a config trains and evaluates on this machine, before a run.

The run is built exactly as ``clpeft run`` builds it (scenario, backbone, strategy, device,
autocast, ``train.compile``, feature cache) but no run directory is written (a ``disk`` feature
cache is filled as a run would fill it). On the first experience it times, each once:

- the feature-cache pass over the training data (frozen backbones only);
- ``warmup`` untimed and then ``steps`` timed optimizer steps of the engine's own loop
  (:meth:`clpeft.run.Run.fit`: ``training_step``, backward, clipping, ``optimizer.step``,
  ``after_training_step``), within the configured epochs;
- ``after_experience`` (prototypes, statistics, alignment: the whole cost of closed-form methods);
- one evaluation pass over the experience's test set.

and extrapolates to the whole stream with the first experience's rates::

    train_s ~ epochs * sum_i |train_i| / (train samples/s) + T * after_experience_s + cache pass of every experience
    eval_s  ~ rows * sum_j |test_j| / (eval samples/s),   rows = T (+1 with eval.baseline)

Replay memories and growing heads make later experiences somewhat slower than the estimate.

A test-time-adaptation config times the source training as above (none with
``source_checkpoint``) and then ``adapt`` on ``steps`` unlabeled batches of the first domain, in
stream order (the first batch untimed when ``warmup > 0``); the evaluation estimate is every
domain's test data at that rate.
"""

from __future__ import annotations

import dataclasses
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from clpeft.config import RunConfig
from clpeft.engine import Engine
from clpeft.errors import UserError
from clpeft.experience import Experience
from clpeft.logging import RunLogger
from clpeft.run import Run, peak_memory_mb


@dataclass
class BenchResult:
    """What ``clpeft bench`` measured (rates in samples per second, times in seconds)."""

    device: str
    strategy: str
    batch_size: int
    steps: int
    step_s: float | None  # median seconds per optimizer step (None: the method takes no gradient steps)
    train_samples_per_s: float | None
    cache_s: float | None  # feature-cache pass over the first experience's training data (None: no cache)
    after_experience_s: float
    eval_samples_per_s: float
    peak_memory_mb: float
    estimated_train_s: float
    estimated_eval_s: float
    adapts_online: bool = False  # test-time adaptation: eval_samples_per_s is the rate of ``adapt``

    def to_dict(self) -> dict:
        return asdict(self)


def _clock(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter()


def bench(cfg: RunConfig, device: str = "auto", steps: int = 20, warmup: int = 3) -> BenchResult:
    """Measure ``cfg`` on this machine (see the module docstring); writes no run directory."""
    if steps < 1 or warmup < 0:
        raise UserError(f"--steps must be >= 1 and --warmup >= 0 (got {steps} and {warmup})")
    with tempfile.TemporaryDirectory() as tmp:
        run = Engine(cfg, Path(tmp) / "bench", device=device).build()
        log = RunLogger(Path(tmp), tensorboard=False, progress="never", enabled=False)
        if run.scenario.kind == "test_time_adaptation":
            return _bench_adaptation(run, log, steps, warmup)
        train, dev, stream = cfg.train, run.device, run.stream
        exp = stream[0]
        data, cache_s, timed, after_s = _time_training(run, log, exp, steps, warmup)

    run.data.refresh_cache(run.strategy.uses_features or run.strategy.needs_query, rekey=False)
    t0 = _clock(dev)
    run.correct(exp.test)
    eval_rate = len(exp.test) / max(_clock(dev) - t0, 1e-9)

    step_s, train_rate = _rates(timed)
    total_train = sum(len(e.train) for e in stream)
    rows = len(stream) + (1 if cfg.eval.baseline else 0)
    estimated_train = (train.epochs * total_train / train_rate if train_rate else 0.0) + len(stream) * after_s
    if cache_s and len(data):
        estimated_train += cache_s * total_train / len(data)
    return BenchResult(
        device=str(dev),
        strategy=cfg.strategy.name,
        batch_size=train.batch_size,
        steps=len(timed),
        step_s=step_s,
        train_samples_per_s=train_rate,
        cache_s=cache_s,
        after_experience_s=after_s,
        eval_samples_per_s=eval_rate,
        peak_memory_mb=peak_memory_mb(dev),
        estimated_train_s=estimated_train,
        estimated_eval_s=rows * sum(len(e.test) for e in stream) / eval_rate,
    )


def _bench_adaptation(run: Run, log: RunLogger, steps: int, warmup: int) -> BenchResult:
    """Test-time adaptation: the source training (unless ``source_checkpoint``), then ``adapt`` on
    ``steps`` unlabeled batches of the first domain, in stream order, as the engine runs it."""
    cfg, scenario, dev, strategy = run.cfg, run.scenario, run.device, run.strategy
    classes = list(range(len(scenario.class_names)))
    timed, after_s, train_rate, cache_s = [], 0.0, None, None
    if scenario.source is not None and scenario.source_checkpoint is None:
        source = Experience(0, scenario.source, None, classes, classes, domain="source")
        _, cache_s, timed, after_s = _time_training(run, log, source, steps, warmup)
    domain = run.stream[0]
    strategy.eval()
    strategy.before_experience(dataclasses.replace(domain, test=None))
    strategy.refresh_input_mode()
    strategy.to(dev)
    untimed = min(warmup, 1)  # the stream is adapted to once, in order: at most its first batch goes untimed
    seen, t0 = 0, None
    for i, x in enumerate(run.data.inputs(domain.test, cfg.train.batch_size, uses_features=strategy.uses_features)):
        if i == untimed:
            t0, seen = _clock(dev), 0
        with torch.enable_grad(), run.autocast():
            strategy.adapt(x)
        seen += len(x)
        if i + 1 == untimed + steps:
            break
    adapt_rate = seen / max(_clock(dev) - t0, 1e-9) if t0 is not None else None
    if adapt_rate is None:
        raise UserError(f"domain {domain.domain} has too few test samples to time adaptation (need more than one batch)")
    step_s, train_rate = _rates(timed)
    estimated_train = (cfg.train.epochs * len(scenario.source) / train_rate + after_s) if train_rate else after_s
    return BenchResult(
        device=str(dev),
        strategy=cfg.strategy.name,
        batch_size=cfg.train.batch_size,
        steps=len(timed),
        step_s=step_s,
        train_samples_per_s=train_rate,
        cache_s=cache_s,
        after_experience_s=after_s,
        eval_samples_per_s=adapt_rate,
        peak_memory_mb=peak_memory_mb(dev),
        estimated_train_s=estimated_train,
        estimated_eval_s=sum(len(e.test) for e in run.stream) / adapt_rate,
        adapts_online=True,
    )


def _time_training(run: Run, log: RunLogger, exp: Experience, steps: int, warmup: int):
    """The engine's own phases on ``exp``, timed: :meth:`Run.prepare`, the feature-cache pass, the
    first ``warmup + steps`` optimizer steps of :meth:`Run.fit`, :meth:`Run.conclude`.

    Returns the training data, the cache pass's seconds (None without a cache), the timed
    ``(seconds, samples)`` of every step after the ``warmup`` ones, and the conclusion's seconds.
    """
    data = run.prepare(exp)
    cache_s = None
    if run.data.cache is not None:
        t0 = _clock(run.device)
        run.data.cache.features(data)
        cache_s = _clock(run.device) - t0
    durations: list[tuple[float, int]] = []
    run.fit(exp, data, log, max_steps=warmup + steps, on_step=lambda seconds, n: durations.append((seconds, n)))
    t0 = _clock(run.device)
    run.conclude(exp)
    return data, cache_s, durations[warmup:], _clock(run.device) - t0


def _rates(timed: list[tuple[float, int]]) -> tuple[float | None, float | None]:
    """Median seconds per step and samples per second (None for both without steps)."""
    if not timed:
        return None, None
    return statistics.median(d for d, _ in timed), sum(n for _, n in timed) / sum(d for d, _ in timed)


def format_bench(result: BenchResult) -> str:
    """The human-readable summary ``clpeft bench`` prints."""
    lines = [f"strategy {result.strategy} on {result.device}, batch size {result.batch_size}"]
    if result.step_s is None:
        lines.append("training step         none (the method takes no gradient steps)")
    else:
        lines.append(
            f"training step         {result.step_s * 1e3:.1f} ms median over {result.steps} steps "
            f"({result.train_samples_per_s:.0f} samples/s)"
        )
    if result.cache_s is not None:
        lines.append(f"feature cache         {result.cache_s:.2f} s for the first experience (once per sample)")
    scored = "adaptation (online)" if result.adapts_online else "evaluation         "
    lines += [
        f"after_experience      {result.after_experience_s:.2f} s",
        f"{scored}   {result.eval_samples_per_s:.0f} samples/s",
        f"peak memory           {result.peak_memory_mb:.0f} MB",
        f"estimated full run    train {_duration(result.estimated_train_s)}, evaluation {_duration(result.estimated_eval_s)}",
    ]
    return "\n".join(lines)


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"
