"""Training overhead of clpeft's engine against a plain PyTorch loop and Avalanche ``Naive``.

The same work is done several ways, in one process, interleaved:

* ``plain``          -- a hand-written PyTorch loop: ``x[idx]`` batches, forward, cross-entropy,
                        backward, SGD step (the reference of every ratio);
* ``clpeft``         -- ``finetune`` run by the stock :class:`clpeft.engine.Engine` from a config
                        (``eval.baseline: false``, ``logging.tensorboard: false``, no progress bar);
* ``avalanche``      -- ``avalanche.training.Naive`` (avalanche-lib 0.6.0) with its default evaluator
                        (accuracy + loss metrics; its ``InteractiveLogger`` output goes to /dev/null);
* ``avalanche_lean`` -- the same ``Naive`` with an empty evaluator (no metrics, no loggers);
* ``plain_index_select`` (only when named in ``--variants``) -- ``plain`` with
                        ``x.index_select(0, idx)``, a faster CPU gather than ``x[idx]``.

Same work means: the same class-incremental stream (built once by clpeft's
``class_incremental`` scenario; Avalanche gets the same tensors through ``tensors_benchmark``),
the same model (an MLP ``784 -> hidden -> ReLU`` backbone and a linear head that grows to the
classes seen so far), the same initial weights (backbone and every head row), the same
optimizer (SGD, lr 0.01, no momentum, rebuilt or reset each experience), the same batch size,
epochs and number of optimizer steps (counted in the warm-up run by a global optimizer hook and
checked). ``plain`` also uses clpeft's shuffling order, so ``plain`` and ``clpeft`` must end with
bitwise-equal weights (checked): nobody skips work. Avalanche shuffles with its own DataLoader,
so its accuracy is close, not equal.

Timed: training only -- per experience, from head growth / optimizer set-up to the last optimizer
step (clpeft: ``Run.train_experience``; Avalanche: ``strategy.train(exp)``). Evaluation,
checkpoints and data loading are outside the timed region (clpeft's whole ``Engine.run`` is
reported apart). After one untimed warm-up run of each variant, every variant runs
``--repeats`` times, the order rotating each round so machine noise hits all of them. The table
gives median and best totals, the "floor" (sum over experiences of each experience's best time:
robust to bursts of load on a shared machine), the median of per-round ratios, and CPU time.

    python benchmarks/engine_overhead.py                          # Fashion-MNIST, 3 epochs, 2 threads
    python benchmarks/engine_overhead.py --train-per-class 1000 --repeats 10
    python benchmarks/engine_overhead.py --threads 1 --variants plain,plain_index_select,clpeft
    python benchmarks/engine_overhead.py --profile                # + cProfile of the timed regions

HF_HUB_OFFLINE is set to 1 and CLPEFT_CACHE (the staged dataset) defaults to a temporary
directory that is removed at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import math
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import warnings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
warnings.filterwarnings("ignore")  # Avalanche's import-time and deprecation warnings

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402
from torch.optim.optimizer import register_optimizer_step_post_hook  # noqa: E402

VARIANTS = ("plain", "clpeft", "avalanche", "avalanche_lean")
OPTIONAL = ("plain_index_select",)  # run only when named in --variants


# ----------------------------------------------------------------------------- shared setup


def make_config(args, data_root: str) -> dict:
    return {
        "seed": args.seed,
        "scenario": {
            "name": "class_incremental",
            "dataset": args.dataset,
            "n_experiences": args.experiences,
            "train_per_class": args.train_per_class,
            "root": data_root,
        },
        "backbone": {"name": "mlp", "hidden": [args.hidden]},
        "strategy": {"name": "finetune"},
        "train": {
            "epochs": args.epochs,
            "batch_size": args.batch_size,
            "lr": args.lr,
            "optimizer": "sgd",
            "momentum": 0.0,
            "amp": "off",
            "num_workers": 0,
        },
        "eval": {"batch_size": 256, "baseline": False},
        "logging": {"tensorboard": False, "progress": "never", "keep_checkpoints": 1},
    }


class Clock:
    """Accumulates wall time (perf_counter) and process CPU time over timed regions.

    When ``Clock.profiler`` is set (``--profile``), the timed regions -- and only they -- are
    also recorded by that ``cProfile.Profile``.
    """

    profiler = None

    def __init__(self):
        self.wall = 0.0
        self.cpu = 0.0
        self.laps: list[float] = []  # wall time of each timed region (one per experience)

    @contextlib.contextmanager
    def __call__(self):
        prof = Clock.profiler
        if prof is not None:
            prof.enable()
        w, c = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            lap = time.perf_counter() - w
            self.wall += lap
            self.cpu += time.process_time() - c
            self.laps.append(lap)
            if prof is not None:
                prof.disable()


class Stream:
    """The class-incremental stream as plain tensors, plus the reference initial weights."""

    def __init__(self, cfg: dict, args):
        from clpeft import config
        from clpeft.seeding import derive_seed, seed_everything

        run_cfg = config.resolve(cfg)
        scenario = run_cfg.scenario.build(seed=run_cfg.seed)
        exps = scenario.experiences()
        self.seed = run_cfg.seed

        def tensors(view):
            x, y = view.load()
            # exactly what clpeft's mlp backbone does to a raw batch: flatten, float, / 255
            return x.flatten(1).float() / 255.0, y.clone()

        self.train = [tensors(e.train) for e in exps]
        self.test = [tensors(e.test) for e in exps]
        self.n_seen = [e.n_classes_seen for e in exps]
        self.in_dim = self.train[0][0].shape[1]
        self.order_seeds = [derive_seed(self.seed, i, "order") for i in range(len(exps))]
        # Initial weights as clpeft draws them: the backbone right after seeding with the run
        # seed, each experience's new head rows right after seeding with derive_seed(seed, i).
        seed_everything(self.seed)
        first = nn.Linear(self.in_dim, args.hidden)
        self.backbone_init = {k: v.clone() for k, v in first.state_dict().items()}
        self.head_rows = []
        prev = 0
        for i, n in enumerate(self.n_seen):
            seed_everything(derive_seed(self.seed, i))
            self.head_rows.append(_new_head_rows(n - prev, args.hidden))
            prev = n

    def steps(self, epochs: int, batch_size: int) -> int:
        return sum(epochs * math.ceil(len(y) / batch_size) for _, y in self.train)


def _new_head_rows(extra: int, in_features: int):
    """New rows of a grown linear head: ``nn.Linear``'s default initialisation (as LinearHead)."""
    w = torch.empty(extra, in_features)
    nn.init.kaiming_uniform_(w, a=math.sqrt(5))
    bound = 1.0 / math.sqrt(in_features)
    b = torch.empty(extra).uniform_(-bound, bound)
    return w, b


@torch.no_grad()
def accuracy(forward, x: torch.Tensor, y: torch.Tensor) -> float:
    correct = 0
    for xb, yb in zip(x.split(1024), y.split(1024)):
        correct += int((forward(xb).argmax(1) == yb).sum())
    return correct / len(y)


def final_accuracy(forward, stream: Stream) -> tuple[float, float]:
    """(accuracy on the whole test set, accuracy on the last experience's test set)."""
    x = torch.cat([t[0] for t in stream.test])
    y = torch.cat([t[1] for t in stream.test])
    return accuracy(forward, x, y), accuracy(forward, *stream.test[-1])


# ----------------------------------------------------------------------------- (a) plain loop


def run_plain(stream: Stream, args, index_select: bool = False) -> dict:
    body = nn.Sequential(nn.Linear(stream.in_dim, args.hidden), nn.ReLU())
    body[0].load_state_dict(stream.backbone_init)
    head = nn.Linear(args.hidden, 0)
    clock = Clock()
    for i, (x, y) in enumerate(stream.train):
        with clock():
            w, b = stream.head_rows[i]  # grow the head to the classes seen so far
            new = nn.Linear(args.hidden, head.out_features + len(b))
            with torch.no_grad():
                new.weight.copy_(torch.cat([head.weight, w]))
                new.bias.copy_(torch.cat([head.bias, b]))
            head = new
            opt = torch.optim.SGD([*body.parameters(), *head.parameters()], lr=args.lr, momentum=0.0)
            order = torch.Generator().manual_seed(stream.order_seeds[i])
            body.train()
            for _ in range(args.epochs):
                total = 0.0
                for idx in torch.randperm(len(y), generator=order).split(args.batch_size):
                    if index_select:  # a faster gather than advanced indexing on CPU
                        xb, yb = x.index_select(0, idx), y.index_select(0, idx)
                    else:
                        xb, yb = x[idx], y[idx]
                    loss = F.cross_entropy(head(body(xb)), yb)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    total += loss.item() * len(yb)
    body.eval()
    acc_all, acc_last = final_accuracy(lambda xb: head(body(xb)), stream)
    weights = [p.detach().clone() for p in (*body.parameters(), *head.parameters())]
    return {"train_s": clock.wall, "cpu_s": clock.cpu, "laps": clock.laps, "acc_all": acc_all, "acc_last": acc_last, "weights": weights}


# ----------------------------------------------------------------------------- (b) clpeft


def run_clpeft(stream: Stream, args, cfg: dict, workdir: str) -> dict:
    from clpeft import config
    from clpeft.engine import Engine

    clock = Clock()
    out_dir = tempfile.mkdtemp(prefix="clpeft-run-", dir=workdir)
    try:
        engine = Engine(config.resolve(cfg), out_dir, device="cpu")
        built = engine.build()
        train_experience = built.train_experience

        def timed(exp, log):  # the stock engine, with only its training phase timed
            with clock():
                return train_experience(exp, log)

        built.train_experience = timed
        t0 = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):  # the engine prints a line per experience
            result = engine.run(built)
        run_s = time.perf_counter() - t0
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
    s = built.strategy
    s.eval()
    net = s.backbone.net
    forward = lambda xb: s.head(net(xb))  # noqa: E731 -- same weights, fed the /255 tensors
    acc_all, acc_last = final_accuracy(forward, stream)
    # the engine's own accuracy matrix must agree with ours
    row = result["acc_matrix"][-1]
    sizes = result["test_sizes"]
    engine_acc = sum(a * n for a, n in zip(row, sizes)) / sum(sizes)
    weights = [p.detach().clone() for p in (*net.parameters(), s.head.weight, s.head.bias)]
    return {
        "train_s": clock.wall,
        "cpu_s": clock.cpu,
        "laps": clock.laps,
        "run_s": run_s,
        "acc_all": acc_all,
        "acc_last": acc_last,
        "engine_acc_all": engine_acc,
        "weights": weights,
    }


# ----------------------------------------------------------------------------- (c) Avalanche


def run_avalanche(stream: Stream, args, lean: bool) -> dict:
    from avalanche.benchmarks import tensors_benchmark
    from avalanche.core import SupervisedPlugin
    from avalanche.models import IncrementalClassifier
    from avalanche.training import Naive
    from avalanche.training.plugins import EvaluationPlugin
    from avalanche.training.plugins.evaluation import default_evaluator

    bench = tensors_benchmark(
        train_tensors=[list(t) for t in stream.train],
        test_tensors=[list(t) for t in stream.test],
        task_labels=[0] * len(stream.train),
    )
    head = IncrementalClassifier(args.hidden, initial_out_features=len(stream.head_rows[0][1]), masking=False)
    model = nn.Sequential(nn.Linear(stream.in_dim, args.hidden), nn.ReLU(), head)
    model[0].load_state_dict(stream.backbone_init)

    class SameHeadInit(SupervisedPlugin):
        """Give the head rows Avalanche just added the reference initial values (in place)."""

        def before_training_exp(self, strategy, **kw):
            i = strategy.experience.current_experience
            w, b = stream.head_rows[i]
            lo = stream.n_seen[i] - len(b)
            with torch.no_grad():
                head.classifier.weight[lo:].copy_(w)
                head.classifier.bias[lo:].copy_(b)

    sink = io.StringIO() if lean else open(os.devnull, "w")
    with contextlib.redirect_stdout(sink):  # InteractiveLogger prints progress bars to stdout
        evaluator = EvaluationPlugin(loggers=[]) if lean else default_evaluator()
        strategy = Naive(
            model=model,
            optimizer=torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.0),
            criterion=nn.CrossEntropyLoss(),
            train_mb_size=args.batch_size,
            train_epochs=args.epochs,
            eval_mb_size=256,
            device="cpu",
            plugins=[SameHeadInit()],
            evaluator=evaluator,
            eval_every=-1,
        )
        clock = Clock()
        for exp in bench.train_stream:
            with clock():
                strategy.train(exp, num_workers=0)
    if not lean:
        sink.close()
    model.eval()
    acc_all, acc_last = final_accuracy(model, stream)
    return {"train_s": clock.wall, "cpu_s": clock.cpu, "laps": clock.laps, "acc_all": acc_all, "acc_last": acc_last}


# ----------------------------------------------------------------------------- main


def profile_runs(runners: dict, variants: list[str], top: int) -> None:
    """cProfile the timed (training) regions of one run of each variant; print the top functions."""
    import cProfile
    import pstats

    for name in variants:
        Clock.profiler = prof = cProfile.Profile()
        try:
            res = runners[name]()
        finally:
            Clock.profiler = None
        buf = io.StringIO()
        stats = pstats.Stats(prof, stream=buf).strip_dirs()
        total = stats.total_tt
        print(
            f"\n=== cProfile of the training regions of one {name} run: {total:.3f} s profiled "
            f"({res['train_s']:.3f} s wall with the profiler on; profiling inflates Python-heavy code) ==="
        )
        stats.sort_stats("tottime").print_stats(top)
        if name != "plain":
            stats.sort_stats("cumulative").print_stats(top)
        print(buf.getvalue())


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", default="fashion_mnist", choices=["fashion_mnist", "sklearn_digits"])
    p.add_argument("--experiences", type=int, default=5)
    p.add_argument("--train-per-class", type=int, default=None, help="subsample the training set")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated, from {VARIANTS + OPTIONAL}")
    p.add_argument("--profile", action="store_true", help="also cProfile the training regions of one run of each variant")
    p.add_argument("--profile-top", type=int, default=25)
    args = p.parse_args(argv)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if "plain" not in variants or any(v not in VARIANTS + OPTIONAL for v in variants):
        p.error(f"--variants must include 'plain' and name only {VARIANTS + OPTIONAL}")

    torch.set_num_threads(args.threads)
    workdir = tempfile.mkdtemp(prefix="clpeft-bench-")
    os.environ.setdefault("CLPEFT_CACHE", os.path.join(workdir, "cache"))
    data_root = os.path.join(os.environ["CLPEFT_CACHE"], "data")
    try:
        import avalanche  # noqa: F401 -- import once, outside any timing (it is slow to import)

        cfg = make_config(args, data_root)
        stream = Stream(cfg, args)
        expected_steps = stream.steps(args.epochs, args.batch_size)
        print(
            f"engine overhead: {args.dataset}, {len(stream.train)} experiences, "
            f"{sum(len(y) for _, y in stream.train)} train samples, mlp {stream.in_dim}->{args.hidden}->grow, "
            f"{args.epochs} epochs, batch {args.batch_size}, SGD lr {args.lr}, {expected_steps} optimizer steps; "
            f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
            f"{platform.machine()} ({os.cpu_count()} CPUs), "
            f"python {platform.python_version()}; load average {_load()}"
        )

        runners = {
            "plain": lambda: run_plain(stream, args),
            "plain_index_select": lambda: run_plain(stream, args, index_select=True),
            "clpeft": lambda: run_clpeft(stream, args, cfg, workdir),
            "avalanche": lambda: run_avalanche(stream, args, lean=False),
            "avalanche_lean": lambda: run_avalanche(stream, args, lean=True),
        }
        # warm-up run of each variant (imports, allocator, first-call costs), not recorded; it
        # also counts the optimizer steps each variant really makes (the hook is removed after)
        steps_made: dict[str, int] = {}
        for v in variants:
            count = [0]
            handle = register_optimizer_step_post_hook(lambda *a, count=count: count.__setitem__(0, count[0] + 1))
            try:
                runners[v]()
            finally:
                handle.remove()
            steps_made[v] = count[0]
        results: dict[str, list[dict]] = {v: [] for v in variants}
        for r in range(args.repeats):
            order = variants[r % len(variants) :] + variants[: r % len(variants)]
            for v in order:
                results[v].append(runners[v]())
            times = "  ".join(f"{v} {results[v][-1]['train_s']:.3f}s" for v in variants)
            print(f"  round {r + 1}/{args.repeats}: {times}", flush=True)

        print(f"load average after the timed rounds: {_load()}")

        # ---- checks: same number of steps; plain and clpeft identical
        print("optimizer steps per run: " + ", ".join(f"{v} {n}" for v, n in steps_made.items()))
        if set(steps_made.values()) != {expected_steps}:
            raise SystemExit(f"the variants made different numbers of optimizer steps: {steps_made}")
        if "clpeft" in variants:
            a, b = results["plain"][0]["weights"], results["clpeft"][0]["weights"]
            max_diff = max(float((x - y).abs().max()) for x, y in zip(a, b))
            print(f"plain vs clpeft final weights: max |diff| = {max_diff:.3g}" + ("  (bitwise equal)" if max_diff == 0 else ""))
            e = results["clpeft"][0]
            if abs(e["engine_acc_all"] - e["acc_all"]) > 1e-9:
                raise SystemExit(f"clpeft engine accuracy {e['engine_acc_all']} != recomputed {e['acc_all']}")

        # ---- table. Timings on a shared machine carry positive noise, so besides the median
        # and best totals: the median of per-round ratios (runs made moments apart) and the
        # "floor", the sum over experiences of each experience's best time across repeats.
        def med(v, key="train_s"):
            return statistics.median(res[key] for res in results[v])

        def best(v):
            return min(res["train_s"] for res in results[v])

        def floor(v):
            return sum(min(laps) for laps in zip(*(res["laps"] for res in results[v])))

        def paired(v):
            return statistics.median(a["train_s"] / b["train_s"] for a, b in zip(results[v], results["plain"]))

        print(f"\ntraining time, wall clock, {args.repeats} interleaved repeats (evaluation excluded); ratios against plain")
        print(
            "| variant | median s | best s | floor s | ratio of medians | ratio of bests | ratio of floors "
            "| median per-round ratio | CPU-time ratio (medians) | acc, all 10 classes | acc, last experience |"
        )
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for v in variants:
            accs = results[v][-1]
            print(
                f"| {v} | {med(v):.3f} | {best(v):.3f} | {floor(v):.3f} | {med(v) / med('plain'):.3f} "
                f"| {best(v) / best('plain'):.3f} | {floor(v) / floor('plain'):.3f} | {paired(v):.3f} "
                f"| {med(v, 'cpu_s') / med('plain', 'cpu_s'):.3f} | {accs['acc_all']:.4f} | {accs['acc_last']:.4f} |"
            )
        if "clpeft" in variants:
            print(
                f"\nclpeft / plain: {floor('clpeft') / floor('plain'):.3f} (floors), "
                f"{paired('clpeft'):.3f} (median per-round ratio); goal <= 1.05"
            )
            runs = [res["run_s"] for res in results["clpeft"]]
            evals = [res["run_s"] - res["train_s"] for res in results["clpeft"]]
            print(
                f"\nclpeft whole Engine.run (incl. data load, per-experience evaluation of all test sets, "
                f"checkpoints): median {statistics.median(runs):.3f} s, of which outside training "
                f"{statistics.median(evals):.3f} s"
            )
        if args.profile:
            profile_runs(runners, variants, args.profile_top)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
