"""Time every corruption on one batch of uint8 images: ``python benchmarks/corruption_bench.py``.

Usage: ``python benchmarks/corruption_bench.py [--batch 256] [--sizes 32 224] [--severity 5]
[--names NAME ...] [--old PATH]``. ``--old`` times a second copy of ``corruptions.py`` (e.g. the previous commit's,
``git show HEAD~1:scenarios/corruptions.py > /tmp/old_corruptions.py``) on the same batch.
Seconds per batch, best of ``--repeats``.
"""

from __future__ import annotations

import argparse
import importlib.util
import time

import torch

from clpeft.scenarios import corruptions


def _load(path: str):
    spec = importlib.util.spec_from_file_location("old_corruptions", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _best(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--sizes", type=int, nargs="+", default=[32, 224])
    parser.add_argument("--severity", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--names", nargs="+", default=corruptions.IMAGENET_C)
    parser.add_argument("--old")
    args = parser.parse_args()
    old = _load(args.old) if args.old else None
    generator = torch.Generator().manual_seed(0)
    print(f"torch threads {torch.get_num_threads()}; batch {args.batch}; severity {args.severity}")
    print("| size | corruption | new (s) |" + (" old (s) |" if old else ""))
    print("|---|---|---|" + ("---|" if old else ""))
    for size in args.sizes:
        images = torch.randint(0, 256, (args.batch, 3, size, size), dtype=torch.uint8, generator=generator)
        indices = torch.arange(args.batch)
        for name in args.names:
            new = _best(lambda: corruptions.corrupt(images, name, args.severity, 0, indices), args.repeats)
            row = f"| {size} | {name} | {new:.3f} |"
            if old:
                if name in old.CORRUPTIONS:
                    row += f" {_best(lambda: old.corrupt(images, name, args.severity, 0, indices), args.repeats):.3f} |"
                else:
                    row += " n/a |"
            print(row, flush=True)


if __name__ == "__main__":
    main()
