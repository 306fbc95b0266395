"""``clpeft merge [CONFIG] [--base ...] [--models ...] [--method ...] [--out ...] [--set k=v]``.

A YAML file (see :mod:`clpeft.merging.config`) describes a merge; flags fill in or override
its values for one-off use, so ``clpeft merge --base b.safetensors --models a.safetensors
c.safetensors --method ties --set density=0.2 --out m.safetensors`` needs no file at all.
``--search scale=0.3:1.5:0.1 --on CONFIG`` merges once per value, scores each merge with a run of
the clpeft config ``CONFIG`` and writes the best (:mod:`clpeft.merging.search`, scored by :func:`_score`).
An ``--out`` directory (any path not ending in ``.safetensors``) receives a sharded
transformers-style checkpoint, resumable with ``--resume`` (:mod:`clpeft.merging.sharded`).
A mergekit YAML (one with ``merge_method``) runs as ``mergekit-yaml CONFIG OUT`` would:
``clpeft merge CONFIG --out DIR`` (:mod:`clpeft.merging.mergekit_yaml`).
A user's mistake raises :class:`~clpeft.errors.UserError`, which the main CLI prints as one
line with exit status 2.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from clpeft.config import apply_overrides, read_yaml
from clpeft.errors import UserError
from clpeft.merging.api import merge_files
from clpeft.merging.config import anchor_paths, resolve_config
from clpeft.merging.mergekit_yaml import is_mergekit_config, run_mergekit
from clpeft.merging.registry import get_method, list_methods
from clpeft.merging.search import parse_search, search_merge

__all__ = ["configure_parser", "run"]


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Add the ``merge`` arguments to ``parser`` (a sub-command parser of ``clpeft``)."""
    parser.description = "Merge fine-tuned checkpoints or LoRA adapters into their base, streaming tensor by tensor."
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = "methods:\n" + "\n".join(
        f"  {m.name:<16} {', '.join(m.parameters) or '-'}  ({m.reference_url})" for m in list_methods() if m.scope == "tensor"
    )
    parser.add_argument("config", nargs="?", help="YAML file with base, models, method, parameters, out, device; or a mergekit YAML")
    parser.add_argument("--base", help="the pretrained checkpoint")
    parser.add_argument("--models", nargs="+", metavar="PATH", help="fine-tuned checkpoints, adapters or run directories")
    parser.add_argument("--method", help="merge method (listed below)")
    parser.add_argument("--out", help="the merged .safetensors file, or a directory for a sharded checkpoint")
    parser.add_argument("--shard-size", default="5G", metavar="SIZE", help="largest output shard of a directory --out (default 5G)")
    parser.add_argument(
        "--resume", action="store_true", help="keep the verified shards of an interrupted merge into the --out directory, merge the rest"
    )
    parser.add_argument("--device", help="cpu or cuda")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a value, e.g. density=0.2")
    parser.add_argument(
        "--search",
        metavar="KEY=START:STOP:STEP",
        help="merge once per value (STOP included; or KEY=V1,V2,...), score each with --on, write the best",
    )
    parser.add_argument(
        "--on",
        metavar="CONFIG",
        help="clpeft run config that scores each merge of --search: its scenario's test data (use a validation "
        "split), its backbone loading the merge as backbone.weights, its strategy (e.g. simplecil); score: acc_last",
    )


def run(args: argparse.Namespace) -> int:
    """Run ``clpeft merge``; returns the exit status.

    A :class:`~clpeft.errors.UserError` leaves as one line: tensor names and paths come from
    the user's files and may hold newlines or terminal escapes, which are shown escaped.
    """
    try:
        return _run(args)
    except UserError as exc:
        exc.args = ("".join(c if c.isprintable() else ascii(c)[1:-1] for c in str(exc)),)
        raise


def _run(args: argparse.Namespace) -> int:
    data = {}
    if args.config:
        data = read_yaml(args.config)
        if is_mergekit_config(data):
            return _run_mergekit(args, data)
        data = anchor_paths(data, Path(args.config).resolve().parent)
    flags = {"base": args.base, "models": args.models, "method": args.method, "out": args.out, "device": args.device}
    data |= {key: value for key, value in flags.items() if value is not None}
    config = resolve_config(apply_overrides(data, args.set))
    if (args.search is None) != (args.on is None):
        raise UserError("--search and --on go together: --search KEY=START:STOP:STEP --on CONFIG")

    def merge(out: Path, report: Path | None, *, shard_size: str = "5G", resume: bool = False, **parameters):
        return merge_files(
            config.base,
            config.models,
            out,
            config.method,
            rules=config.rules,
            device=config.device,
            seed=config.seed,
            report=report,
            progress=config.progress,
            shard_size=shard_size,
            resume=resume,
            **parameters,
        )

    if args.search is None:
        parameters = get_method(config.method).validate(config.parameters)
        report = merge(config.out, config.report, shard_size=args.shard_size, resume=args.resume, **parameters)
    else:
        report = _search(config, merge, *parse_search(args.search), Path(args.on))
    summary = report.to_dict()["summary"]
    print(
        f"merged {len(config.models)} models with {config.method} into {config.out} in {report.seconds:.1f} s: "
        f"{summary['merged']} tensors merged, {summary['copied_from_base']} copied from the base"
    )
    return 0


def _run_mergekit(args: argparse.Namespace, data: dict) -> int:
    """``clpeft merge MERGEKIT_YAML --out DIR``: the flags that would describe another merge are refused."""
    for flag in ("base", "models", "method", "search", "on"):
        if getattr(args, flag):
            raise UserError(f"--{flag} does not apply to a mergekit YAML, which names its own models and method: remove it")
    if args.set:
        raise UserError("--set does not apply to a mergekit YAML: edit its parameters in the file")
    if not args.out:
        raise UserError("a mergekit YAML needs --out DIR, the transformers directory to write (mergekit-yaml's OUT_PATH)")
    report = run_mergekit(args.config, args.out, device=args.device or "cpu", shard_size=args.shard_size, resume=args.resume, data=data)
    summary = report.to_dict()["summary"]
    print(
        f"merged {len(report.models)} models with {data['merge_method']} (clpeft {report.method}) into {args.out} in "
        f"{report.seconds:.1f} s: {summary['merged']} tensors merged, {summary['copied_from_base']} copied from the base"
    )
    return 0


def _search(config, merge, parameter: str, values: list[float], on: Path):
    """Run the search, print its table, return the final merge's report."""
    report_path = config.report or config.out.with_name(f"{config.out.stem}.report.json")
    search_path = config.out.with_name(f"{config.out.stem}.search.json")
    report, result = search_merge(
        merge,
        method=config.method,
        params=config.parameters,
        parameter=parameter,
        values=values,
        score=lambda candidate, scratch: _score(on, candidate, scratch, config.device),
        on=on,
        out=config.out,
        outputs={"out": config.out, "report": report_path, "search": search_path},
        inputs=[config.base, *config.models],
    )
    print(f"| {parameter} | {result.metric} |\n|---|---|")
    for row in result.table:
        print(f"| {row[parameter]:g} | {row[result.metric]:.4f} |{' best' if row[parameter] == result.best else ''}")
    print(f"best {parameter} = {result.best:g} (table in {search_path})")
    return report


def _score(on: Path, weights: Path, out: Path, device: str) -> dict:
    """A clpeft run of config ``on`` evaluating ``weights`` as its backbone (no baseline, no logs),
    as ``clpeft run ON --set backbone.weights=WEIGHTS`` evaluates a merge."""
    from clpeft.config import load  # (the engine only for --search: a plain merge never loads it)
    from clpeft.engine import Engine

    overrides = [
        f"backbone.weights={json.dumps(str(weights))}",
        "seeds=null",
        "eval.baseline=false",
        "logging.tensorboard=false",
        "logging.progress=never",
    ]
    return Engine(load(on, overrides), out, device=device).run()
