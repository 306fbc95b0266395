"""``clpeft merge [CONFIG] [--base ...] [--models ...] [--method ...] [--out ...] [--set k=v]``.

A YAML file (see :mod:`clpeft.merging.config`) describes a merge; flags fill in or override
its values for one-off use, so ``clpeft merge --base b.safetensors --models a.safetensors
c.safetensors --method ties --set density=0.2 --out m.safetensors`` needs no file at all.
A user's mistake raises :class:`~clpeft.errors.UserError`, which the main CLI prints as one
line with exit status 2.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from clpeft.config import apply_overrides, read_yaml
from clpeft.errors import UserError
from clpeft.merging.api import merge_files
from clpeft.merging.config import anchor_paths, resolve_config
from clpeft.merging.registry import get_method, list_methods

__all__ = ["configure_parser", "run"]


def configure_parser(parser: argparse.ArgumentParser) -> None:
    """Add the ``merge`` arguments to ``parser`` (a sub-command parser of ``clpeft``)."""
    parser.description = "Merge fine-tuned checkpoints or LoRA adapters into their base, streaming tensor by tensor."
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = "methods:\n" + "\n".join(
        f"  {m.name:<16} {', '.join(m.parameters) or '-'}  ({m.reference_url})"
        for m in list_methods()
        if m.scope == "tensor"
    )
    parser.add_argument("config", nargs="?", help="YAML file with base, models, method, parameters, out, device")
    parser.add_argument("--base", help="the pretrained checkpoint")
    parser.add_argument(
        "--models", nargs="+", metavar="PATH", help="fine-tuned checkpoints, adapters or run directories"
    )
    parser.add_argument("--method", help="merge method (listed below)")
    parser.add_argument("--out", help="the merged .safetensors file")
    parser.add_argument("--device", help="cpu or cuda")
    parser.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE", help="override a value, e.g. density=0.2"
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
        data = anchor_paths(read_yaml(args.config), Path(args.config).resolve().parent)
    flags = {"base": args.base, "models": args.models, "method": args.method, "out": args.out, "device": args.device}
    data |= {key: value for key, value in flags.items() if value is not None}
    config = resolve_config(apply_overrides(data, args.set))
    parameters = get_method(config.method).validate(config.parameters)
    report = merge_files(
        config.base,
        config.models,
        config.out,
        config.method,
        rules=config.rules,
        device=config.device,
        seed=config.seed,
        report=config.report,
        progress=config.progress,
        **parameters,
    )
    summary = report.to_dict()["summary"]
    print(
        f"merged {len(config.models)} models with {config.method} into {config.out} in {report.seconds:.1f} s: "
        f"{summary['merged']} tensors merged, {summary['copied_from_base']} copied from the base"
    )
    return 0
