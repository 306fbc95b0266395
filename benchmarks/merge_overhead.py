"""The per-tensor cost of an in-memory merge: this checkout against another, side by side.

A merge of a model with many small tensors (LoRA adapters, biases and norms, a ViT's 152
tensors) spends most of its time around the arithmetic: checks, views, the report's
statistics. This script merges in memory with ``merge(..., out=...)`` (no fresh pages: the
merge's own cost) two shapes of state dict, each in its own subprocess per checkout, in
interleaved rounds:

* ``small``: ``--tensors`` tensors of ``--numel`` entries (default 1,000 x 4,096);
* ``vit-b``: the 152 tensors of a ViT-B/16 (86.6M parameters; ``merge_bench.vit_shapes``).

Printed: the best wall seconds per merge (of ``--repeats`` merges per subprocess and every
round), milliseconds per tensor, and this checkout's speed-up over ``--other-clpeft``.

Usage:
    mkdir /tmp/before && git archive <commit> clpeft strategies scenarios | tar -x -C /tmp/before
    OMP_NUM_THREADS=1 python benchmarks/merge_overhead.py --other-clpeft /tmp/before
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
METHODS = {"task_arithmetic": {"scale": 0.3}, "ties": {"density": 0.2, "trim_scope": "tensor"}}


def shapes(shape: str, tensors: int, numel: int) -> dict[str, tuple[int, ...]]:
    if shape == "small":
        return {f"layer{i}.weight": (numel,) for i in range(tensors)}
    sys.path.insert(0, str(HERE))
    from merge_bench import SIZES, vit_shapes

    return vit_shapes(**SIZES["full"])


def worker(shape: str, dtype: str, method: str, tensors: int, numel: int, models: int, repeats: int) -> None:
    """Best wall seconds of ``repeats`` in-memory merges into existing tensors, as one JSON line."""
    import clpeft
    from clpeft.merging import merge

    generator = torch.Generator().manual_seed(0)
    base = {n: torch.randn(s, generator=generator) * 0.02 for n, s in shapes(shape, tensors, numel).items()}
    finetuned = [
        {n: (t + torch.randn(t.shape, generator=generator) * 1e-3).to(getattr(torch, dtype)) for n, t in base.items()}
        for _ in range(models)
    ]
    base = {n: t.to(getattr(torch, dtype)) for n, t in base.items()}
    out = {n: t.clone() for n, t in base.items()}
    merge(base, finetuned, method, out=out, **METHODS[method])  # the kernel compiled or loaded, first-call costs paid
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        merge(base, finetuned, method, out=out, **METHODS[method])
        best = min(best, time.perf_counter() - start)
    print(json.dumps({"wall_s": best, "tensors": len(base), "clpeft": clpeft.__file__}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--other-clpeft", type=Path, required=True, help="checkout to compare with (e.g. a git archive)")
    parser.add_argument("--shapes", default="small,vit-b")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--methods", default="task_arithmetic", help=f"comma-separated subset of {', '.join(METHODS)}")
    parser.add_argument("--tensors", type=int, default=1000)
    parser.add_argument("--numel", type=int, default=4096)
    parser.add_argument("--models", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5, help="merges per subprocess")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved subprocesses per case and checkout")
    args = parser.parse_args()

    checkouts = {"this": HERE.parent, "other": args.other_clpeft.resolve()}
    cases = [(s, d, m) for s in args.shapes.split(",") for d in args.dtypes.split(",") for m in args.methods.split(",")]
    best: dict[tuple, float] = {}
    counts: dict[tuple, int] = {}
    for _ in range(args.rounds):
        for case in cases:
            for name, root in checkouts.items():
                command = [
                    sys.executable,
                    str(Path(__file__).resolve()),
                    "--worker",
                    *case,
                    *map(str, (args.tensors, args.numel, args.models, args.repeats)),
                ]
                env = {**os.environ, "PYTHONPATH": str(root)}
                done = subprocess.run(command, capture_output=True, text=True, env=env, cwd=root, check=True)
                result = json.loads(done.stdout.strip().splitlines()[-1])
                if not Path(result["clpeft"]).resolve().is_relative_to(root):
                    sys.exit(f"the {name} run imported {result['clpeft']}, not the clpeft of {root}")
                best[(*case, name)] = min(best.get((*case, name), float("inf")), result["wall_s"])
                counts[case] = result["tensors"]

    print(
        f"machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
    )
    print(
        f"command: python benchmarks/merge_overhead.py {' '.join(sys.argv[1:])} (OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', '-')})"
    )
    print("| shape | dtype | method | tensors | this: s (ms / tensor) | other: s (ms / tensor) | speed-up |")
    print("|---|---|---|---|---|---|---|")
    for case in cases:
        this, other, n = best[(*case, "this")], best[(*case, "other")], counts[case]
        print(
            f"| {' | '.join(case)} | {n} | {this:.3f} ({this / n * 1e3:.3f}) | {other:.3f} ({other / n * 1e3:.3f}) | {other / this:.2f}x |"
        )


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        shape, dtype, method, tensors, numel, models, repeats = sys.argv[2:9]
        worker(shape, dtype, method, int(tensors), int(numel), int(models), int(repeats))
    else:
        main()
