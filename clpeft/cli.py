"""``clpeft run | bench | validate | list | compare | report | sweep | reproduce | merge`` (also ``python -m clpeft``)."""

from __future__ import annotations

import argparse
import errno
import functools
import importlib.util
import os
import re
import sys
import time
import warnings
from pathlib import Path

from clpeft.errors import UserError


def _run(args) -> int:
    from clpeft import config, distributed
    from clpeft.engine import Engine
    from clpeft.tools.report import format_run

    target = Path(args.config)
    out = args.out
    if target.is_dir():  # `clpeft run RUN_DIR --resume`
        out = out or str(target)
        target = target / "config.yaml"
    overrides = [*(args.set or []), *_seed_overrides(args)]
    cfg = config.load(target, overrides)
    if out is None:
        if args.resume:
            raise UserError("--resume needs the run directory: clpeft run RUN_DIR --resume (or --out RUN_DIR)")
        out = cfg.out or f"runs/{target.stem}-{_method_name(cfg.strategy.name)}-{time.strftime('%Y%m%d-%H%M%S')}"
    engine_kwargs = {"device": args.device, "force": args.force, "deterministic": args.deterministic}
    world, _ = distributed.init_from_env(args.device)  # under torchrun: join the ranks before touching OUT
    out = world.broadcast_object(out)  # one directory, even when it is named after the start time
    say = print if world.is_main else _silent  # only rank 0 prints
    if cfg.seeds:
        from clpeft.tools.report import format_seeds_summary
        from clpeft.tools.seed_summary import SUMMARY_FILE
        from clpeft.tools.seeds import run_seeds

        def done(seed, result):
            say(f"seed {seed}: acc_final {result['metrics'].get('acc_final', float('nan')):.4f}  ({Path(out) / f'seed_{seed}'})")

        summary = run_seeds(cfg, out, engine_kwargs, resume=args.resume, on_done=done)
        say(f"\n{format_seeds_summary(summary)}\n\nrun directory: {out}  (summary in {Path(out) / SUMMARY_FILE})")
        return 0
    result = Engine(cfg, out, resume=args.resume, **engine_kwargs).run()
    say(f"\n{format_run(result)}")  # as fits the scenario: per domain, per session, old/new, per class
    timing = result["timing"]
    cache = f", feature cache fill {timing['cache_s']:.1f} s" if timing.get("cache_s") else ""
    say(f"\nrun directory: {out}  (train {timing['train_s']:.1f} s, eval {timing['eval_s']:.1f} s{cache})")
    return 0


def _bench(args) -> int:
    import json

    from clpeft import config
    from clpeft.tools.bench import bench, format_bench

    result = bench(config.load(args.config, args.set), device=args.device, steps=args.steps, warmup=args.warmup)
    print(json.dumps(result.to_dict(), indent=2) if args.json else format_bench(result))
    return 0


def _method_name(name: str) -> str:
    """A strategy name fit for a directory: ``l2p``, or the class of a plug-in ``path/my.py:MyMethod``."""
    return re.sub(r"[^\w.-]", "_", name.rpartition(":")[2])


def _silent(*args, **kwargs) -> None:
    """``print`` on the non-zero ranks of a data-parallel run."""


def parse_seeds(text: str) -> list[int]:
    """``"0,1,2"`` -> ``[0, 1, 2]``."""
    try:
        seeds = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UserError(f"--seeds expects comma-separated integers such as 0,1,2, got '{text}'") from None
    if not seeds:
        raise UserError(f"--seeds expects comma-separated integers such as 0,1,2, got '{text}'")
    return seeds


def _seed_overrides(args) -> list[str]:
    """``--seed N`` runs that one seed (clearing a ``seeds:`` list); ``--seeds 0,1,2`` runs several."""
    if args.seed is not None and args.seeds:
        raise UserError("give --seed N (one run) or --seeds 0,1,2 (one run per seed), not both")
    if args.seed is not None:
        return [f"seed={args.seed}", "seeds=null"]
    if args.seeds:
        return [f"seeds={parse_seeds(args.seeds)}"]
    return []


def _validate(args) -> int:
    from clpeft import config
    from clpeft.engine import Engine
    from clpeft.errors import UserErrors

    failed: list[UserError] = []
    named = len(args.config) > 1  # with several configs, each problem names its file
    for path in args.config:
        try:
            cfg = config.load(path, args.set)
            if not args.config_only:  # the data, the weights, the strategy: all a run checks before training
                Engine(cfg, Path(path).parent / ".clpeft-validate", device="cpu").check()
        except UserError as exc:
            failed.extend(UserError(f"{path}: {m}" if named else m) for m in getattr(exc, "messages", [str(exc)]))
            continue
        print(f"{path}: ok (scenario {cfg.scenario.name}, backbone {cfg.backbone.name}, strategy {cfg.strategy.name})")
    if failed:
        raise UserErrors.of(failed)
    return 0


def _list(args) -> int:
    from clpeft import registry
    from clpeft.backbones.offline_weights import list_offline_weights
    from clpeft.backbones.text import list_text_weights

    if args.markdown:
        from clpeft.tools.docs import config_reference

        print(config_reference(), end="")
        return 0
    from clpeft.merging.registry import list_methods

    for reg in (registry.strategies, registry.scenarios, registry.backbones):
        print(f"{reg.kind} names:")
        for name, cls in reg.items():
            print(f"  {name:<24} {registry.describe(cls)}")
    print("merge methods (clpeft merge --method; parameters: clpeft merge --help):")
    for method in list_methods():
        print(f"  {method.name:<24} {method.description}")
    print("offline weights (backbone.weights):")
    for w in list_offline_weights():
        print(f"  {w.name:<24} {w.model}: {w.description}")
    for w in list_text_weights():
        print(f"  {w.name:<24} {w.kind}: {w.description}")
    return 0


def _report(args) -> int:
    from clpeft.tools.report import write_report

    text, out = write_report(args.run_dir, args.out)
    print(text)
    print(f"\nwrote {out / 'report.html'} and the PNG plots beside it")
    return 0


def _compare(args) -> int:
    from clpeft.tools.compare import compare

    markdown, table = compare(args.run_dir, percent=not args.fraction)
    print(markdown)
    if args.csv:
        Path(args.csv).write_text(table)
        print(f"\nwrote {args.csv}")
    return 0


def _sweep(args) -> int:
    from clpeft.tools.sweep import format_sweep, parse_grid, run_sweep

    grid = parse_grid(args.grid or [])
    out = args.out or f"runs/sweep-{Path(args.config).stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    overrides = [*(args.set or []), *([f"seeds={parse_seeds(args.seeds)}"] if args.seeds else [])]
    engine_kwargs = {"device": args.device, "force": False, "deterministic": args.deterministic}
    summary = run_sweep(
        args.config,
        grid,
        out,
        engine_kwargs,
        overrides=overrides,
        metric=args.metric,
        tune_set=args.tune_set,
        eval_set=args.eval_set,
        resume=args.resume,
        on_point=lambda name, s: print(f"{name}: {args.metric} = {s['mean']:.4f}"),
    )
    print(f"\n{format_sweep(summary)}\n\nsweep directory: {out}")
    return 0


def _reproduce(args) -> int:
    from clpeft.tools.reproduce import configs_dir, format_outcomes, load_setups, render_markdown, reproduce, select

    directory = configs_dir(args.configs)
    setups = select(load_setups(directory), args.names)
    if args.markdown:
        print(render_markdown(setups), end="")
        return 0
    if args.list:
        for setup in setups:
            print(f"{setup.name:<36} {setup.status}")
        return 0
    outcomes = reproduce(setups, directory, Path(args.data_root).expanduser(), Path(args.out), device=args.device)
    print(format_outcomes(outcomes))
    return 0 if all(o.missing is None for o in outcomes) else 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clpeft", description="Continual learning on pretrained models.")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a continual-learning experiment from a YAML config")
    run.add_argument("config", help="YAML config (or a run directory with --resume)")
    run.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config value, e.g. train.lr=0.1")
    run.add_argument("--out", help="run directory (default runs/<config>-<strategy>-<timestamp>)")
    run.add_argument("--resume", action="store_true", help="continue the run in --out after its last checkpoint")
    run.add_argument("--force", action="store_true", help="with --resume: accept a config that differs from the stored one")
    run.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    run.add_argument("--seed", type=int, help="shorthand for --set seed=N (one run, even if the config lists seeds)")
    run.add_argument("--seeds", metavar="0,1,2", help="one run per seed in OUT/seed_<n>/, then mean ± std in OUT/seeds_summary.json")
    run.add_argument(
        "--deterministic", action="store_true", help="only deterministic algorithms (bitwise-repeatable runs; some CUDA ops then raise)"
    )
    run.set_defaults(func=_run)

    bench = sub.add_parser("bench", help="time a config's training step and evaluation here, and estimate the full run")
    bench.add_argument("config")
    bench.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config value, e.g. train.batch_size=64")
    bench.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    bench.add_argument("--steps", type=int, default=20, help="timed optimizer steps (default 20)")
    bench.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3)")
    bench.add_argument("--json", action="store_true", help="print the measurements as JSON")
    bench.set_defaults(func=_bench)

    validate = sub.add_parser("validate", help="check configs without training: values, data, weights, strategy")
    validate.add_argument("config", nargs="+")
    validate.add_argument("--set", action="append", metavar="KEY=VALUE")
    validate.add_argument(
        "--config-only", action="store_true", help="check the YAML alone (types, names, values), not its data, weights and strategy"
    )
    validate.set_defaults(func=_validate)

    lst = sub.add_parser("list", help="registered strategies, scenarios, backbones and offline weights")
    lst.add_argument("--markdown", action="store_true", help="print the YAML reference of every section as Markdown")
    lst.set_defaults(func=_list)

    report = sub.add_parser("report", help="PNG plots and a self-contained report.html for one or more runs")
    report.add_argument("run_dir", nargs="+", help="run directories (single runs or multi-seed directories)")
    report.add_argument("--out", help="report folder (default: the run directory when there is one)")
    report.set_defaults(func=_report)

    cmp = sub.add_parser("compare", help="a methods x metrics table (mean ± std over seeds) as Markdown and CSV")
    cmp.add_argument("run_dir", nargs="+", help="run directories (single runs or multi-seed directories)")
    cmp.add_argument("--csv", metavar="FILE", help="also write the table as CSV")
    cmp.add_argument("--fraction", action="store_true", help="metrics as fractions in [0, 1] instead of percent")
    cmp.set_defaults(func=_compare)

    from clpeft.tools.sweep import DEFAULT_METRIC

    sweep = sub.add_parser("sweep", help="a grid of runs; tune on one stream, evaluate the best point on another")
    sweep.add_argument("config")
    sweep.add_argument("--grid", action="append", metavar="KEY=[V1,V2]", help="values to try, e.g. train.lr=[0.01,0.001]")
    sweep.add_argument("--set", action="append", metavar="KEY=VALUE", help="override for every point")
    sweep.add_argument("--seeds", metavar="0,1,2", help="run every point with these seeds (ranked by the mean)")
    sweep.add_argument("--metric", default=DEFAULT_METRIC, help=f"scalar metric that picks the best point (default {DEFAULT_METRIC})")
    sweep.add_argument(
        "--tune-set", action="append", metavar="KEY=VALUE", help="override for the tuning stream, e.g. scenario.class_order=1993"
    )
    sweep.add_argument(
        "--eval-set", action="append", metavar="KEY=VALUE", help="override for the evaluation stream, e.g. scenario.class_order=0"
    )
    sweep.add_argument("--out", help="sweep directory (default runs/sweep-<config>-<timestamp>)")
    sweep.add_argument("--resume", action="store_true", help="keep finished points, resume started ones")
    sweep.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    sweep.add_argument("--deterministic", action="store_true")
    sweep.set_defaults(func=_sweep)

    reproduce = sub.add_parser("reproduce", help="run published setups and print the papers' numbers beside clpeft's")
    reproduce.add_argument(
        "names", nargs="*", default=["all"], help="setups (e.g. l2p/cifar100_10t, or l2p for all of L2P's); all by default"
    )
    reproduce.add_argument("--data-root", default="~/data", help="where the datasets are (becomes scenario.root; default ~/data)")
    reproduce.add_argument("--out", default="runs/reproduce", help="run directories, one per setup (resumed if present)")
    reproduce.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    reproduce.add_argument("--configs", help="the configs folder holding published_setups.yaml (default ./configs)")
    reproduce.add_argument("--list", action="store_true", help="list the setups and their status")
    reproduce.add_argument("--markdown", action="store_true", help="print docs/published_setups.md")
    reproduce.set_defaults(func=_reproduce)

    from clpeft.tools import merge_cli

    merge = sub.add_parser("merge", help="merge fine-tuned checkpoints (task arithmetic, TIES, DARE, ...)")
    merge_cli.configure_parser(merge)
    merge.set_defaults(func=merge_cli.run)
    return parser


_OS_HINTS = {
    errno.ENOSPC: "free some space or write elsewhere; a run keeps its completed checkpoints (resume with --resume)",
    errno.EDQUOT: "free some space or write elsewhere; a run keeps its completed checkpoints (resume with --resume)",
    errno.EROFS: "the file system is read-only: write elsewhere (--out)",
    errno.EACCES: "no permission: write elsewhere (--out) or change the permissions",
    errno.ENAMETOOLONG: "choose a shorter path",
    errno.EISDIR: "a file was expected here, not a directory",
    errno.ENOTDIR: "a part of the path is a file, not a directory",
    errno.EEXIST: "a file stands where a directory is needed: move it away",
}


def _describe_os_error(exc: OSError) -> str:
    """``path: what happened; what to do`` for an error the operating system reported."""
    where = f"{exc.filename}: " if exc.filename else ""
    hint = _OS_HINTS.get(exc.errno)
    return f"{where}{exc.strerror or exc}" + (f"; {hint}" if hint else "")


def _clpeft_warning(message, category, filename, lineno, line=None) -> str:
    """clpeft's own warnings (a skipped checkpoint, a rebuilt cache) as one line; others as Python shows them."""
    if issubclass(category, UserWarning) and any(Path(filename).resolve().is_relative_to(d) for d in _own_dirs()):
        return f"clpeft: warning: {message}\n"
    return _python_warning(message, category, filename, lineno, line)


@functools.cache
def _own_dirs() -> tuple[Path, ...]:
    """The folders of clpeft and of its scenarios and strategies (installed apart in an editable install)."""
    names = ("clpeft", "clpeft.scenarios", "clpeft.strategies")
    return tuple(Path(loc).resolve() for name in names for loc in importlib.util.find_spec(name).submodule_search_locations)


_python_warning = warnings.formatwarning


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    warnings.formatwarning = _clpeft_warning
    try:
        code = args.func(args)
        sys.stdout.flush()  # a closed pipe shows here, not in the interpreter's exit
        return code
    except UserError as exc:
        for message in getattr(exc, "messages", [str(exc)]):
            print(f"clpeft: error: {message}", file=sys.stderr)
        return exc.exit_code
    except BrokenPipeError:  # `clpeft compare ... | head` closed the pipe: stop quietly, as other tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # nothing more to flush at exit
        return 141
    except OSError as exc:  # the machine, not clpeft: a full or read-only disk, a name too long, a directory
        print(f"clpeft: error: {_describe_os_error(exc)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if args.command == "merge":  # the output appears only once complete
            print("clpeft: interrupted; no output written", file=sys.stderr)
        else:
            print("clpeft: interrupted; completed experiences are checkpointed (resume with --resume)", file=sys.stderr)
        return 130
    finally:
        from clpeft.distributed import shutdown

        shutdown()
        warnings.formatwarning = _python_warning


if __name__ == "__main__":
    sys.exit(main())
