"""``clpeft run | validate | list | report | merge`` (also ``python -m clpeft``)."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from clpeft.errors import UserError


def _run(args) -> int:
    from clpeft import config
    from clpeft.engine import Engine
    from clpeft.report import format_matrix, format_metrics

    target = Path(args.config)
    out = args.out
    if target.is_dir():  # `clpeft run RUN_DIR --resume`
        out = out or str(target)
        target = target / "config.yaml"
    overrides = list(args.set or [])
    if args.seed is not None:
        overrides.append(f"seed={args.seed}")
    cfg = config.load(target, overrides)
    if out is None:
        if args.resume:
            raise UserError("--resume needs the run directory: clpeft run RUN_DIR --resume (or --out RUN_DIR)")
        out = cfg.out or f"runs/{target.stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    result = Engine(cfg, out, device=args.device, resume=args.resume, force=args.force,
                    deterministic=args.deterministic).run()
    print(f"\naccuracy matrix R[i, j] (after experience i, on experience j):\n{format_matrix(result['acc_matrix'])}")
    print(f"\n{format_metrics(result['metrics'])}")
    print(f"\nrun directory: {out}  (train {result['timing']['train_s']:.1f} s, eval {result['timing']['eval_s']:.1f} s)")
    return 0


def _validate(args) -> int:
    from clpeft import config

    for path in args.config:
        cfg = config.load(path, args.set)
        print(f"{path}: ok (scenario {cfg.scenario.name}, backbone {cfg.backbone.name}, strategy {cfg.strategy.name})")
    return 0


def _list(args) -> int:
    from clpeft import registry
    from clpeft.backbones.offline_weights import list_offline_weights
    from clpeft.backbones.text import list_text_weights

    if args.markdown:
        from clpeft.docs import config_reference

        print(config_reference(), end="")
        return 0
    for reg in (registry.strategies, registry.scenarios, registry.backbones):
        print(f"{reg.kind} names:")
        for name, cls in reg.items():
            print(f"  {name:<24} {registry.describe(cls)}")
    print("offline weights (backbone.weights):")
    for w in list_offline_weights():
        print(f"  {w.name:<24} {w.model}: {w.description}")
    for w in list_text_weights():
        print(f"  {w.name:<24} {w.kind}: {w.description}")
    return 0


def _report(args) -> int:
    from clpeft.report import write_report

    print(write_report(args.run_dir))
    print(f"\nwrote {Path(args.run_dir) / 'acc_matrix.png'}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="clpeft", description="Continual learning on pretrained models.")
    sub = parser.add_subparsers(dest="command", required=True)

    run = sub.add_parser("run", help="run a continual-learning experiment from a YAML config")
    run.add_argument("config", help="YAML config (or a run directory with --resume)")
    run.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config value, e.g. train.lr=0.1")
    run.add_argument("--out", help="run directory (default runs/<config>-<timestamp>)")
    run.add_argument("--resume", action="store_true", help="continue the run in --out after its last checkpoint")
    run.add_argument("--force", action="store_true", help="with --resume: accept a config that differs from the stored one")
    run.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    run.add_argument("--seed", type=int, help="shorthand for --set seed=N")
    run.add_argument("--deterministic", action="store_true",
                     help="only deterministic algorithms (bitwise-repeatable runs; some CUDA ops then raise)")
    run.set_defaults(func=_run)

    validate = sub.add_parser("validate", help="check configs without running them")
    validate.add_argument("config", nargs="+")
    validate.add_argument("--set", action="append", metavar="KEY=VALUE")
    validate.set_defaults(func=_validate)

    lst = sub.add_parser("list", help="registered strategies, scenarios, backbones and offline weights")
    lst.add_argument("--markdown", action="store_true", help="print the YAML reference of every section as Markdown")
    lst.set_defaults(func=_list)

    report = sub.add_parser("report", help="print a run's metrics and write acc_matrix.png")
    report.add_argument("run_dir")
    report.set_defaults(func=_report)

    try:
        from clpeft.merging import cli as merge_cli
    except ImportError:
        merge_cli = None
    if merge_cli is not None:
        merge = sub.add_parser("merge", help="merge fine-tuned checkpoints (task arithmetic, TIES, DARE, ...)")
        merge_cli.configure_parser(merge)
        merge.set_defaults(func=merge_cli.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UserError as exc:
        print(f"clpeft: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("clpeft: interrupted; completed experiences are checkpointed (resume with --resume)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
