"""Start-up cost of the merging entry points with lazy top-level names vs the eager package.

``import clpeft`` loads its top-level names on first use (PEP 562), so ``import clpeft.merging``
and ``clpeft merge`` no longer import the training stack. The eager package imported
``clpeft.data`` and ``clpeft.strategy`` (and through them timm and torchvision) on
``import clpeft``; the "eager" variant imports them explicitly to stand in for it. Each
variant runs in a fresh interpreter, interleaved; best of ``--repeats``.

Usage:
    python benchmarks/import_time.py [--repeats 5]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

VARIANTS = {
    "import clpeft.merging (lazy)": [sys.executable, "-c", "import clpeft.merging"],
    "import clpeft.merging (eager: + clpeft.data, clpeft.strategy)": [
        sys.executable,
        "-c",
        "import clpeft.data, clpeft.strategy, clpeft.merging",
    ],
    "clpeft merge --help (lazy)": [sys.executable, "-m", "clpeft", "merge", "--help"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    best = {name: float("inf") for name in VARIANTS}
    for _ in range(args.repeats):
        for name, command in VARIANTS.items():
            start = time.perf_counter()
            subprocess.run(command, check=True, capture_output=True)
            best[name] = min(best[name], time.perf_counter() - start)
    lazy, eager = best["import clpeft.merging (lazy)"], best["import clpeft.merging (eager: + clpeft.data, clpeft.strategy)"]
    print(f"best of {args.repeats}, wall seconds including interpreter start-up\n")
    print("| command | s |\n|---|---|")
    for name, seconds in best.items():
        print(f"| {name} | {seconds:.2f} |")
    print(f"\neager / lazy: {eager / lazy:.2f}x")


if __name__ == "__main__":
    main()
