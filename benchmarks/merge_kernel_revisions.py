"""The compiled linear-merge loop of two or more revisions side by side, interleaved in one process.

A change to ``clpeft/merging/linear_merge.c`` (a run length, a prefetch distance) moves the merge
speed by a few percent, less than this VM's memory bandwidth drifts in a minute: separate runs
cannot tell it. This script builds the file as each git revision (or the working tree) has it,
with the flags :mod:`clpeft.merging.fused_cpu` uses, and times every build in turn each round on
the same memory: the checkpoints ``benchmarks/merge_vs_mergekit.py --dir DIR`` writes, merged by
:func:`clpeft.merging.fused_cpu.linear_merges` (``merge_kernel_share.py``'s "kernel" column). It
checks that every build writes the first one's bits.

Printed per revision and dtype: median and best GB/s (the K + 2 tensors read and written), and the
median over rounds of each round's speed ratio against the first revision (the paired ratio: a
change of bandwidth between rounds cancels); per revision, bf16 / fp16 speed per byte against
float32, the median of the rounds' ratios.

Only revisions whose C entry points match this checkout's ``fused_cpu`` can be compared (73f3cb4
and later).

Usage:
    OMP_NUM_THREADS=2 python benchmarks/merge_kernel_revisions.py --dir /tmp/mm --revisions dc90248,working --rounds 21
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import threading
import time
from pathlib import Path

import torch
from merge_kernel_share import SCALE, kernel_merges, load

from clpeft.merging import fused_cpu

ROOT = Path(__file__).resolve().parents[1]
KERNEL = "clpeft/merging/linear_merge.c"


def source(revision: str) -> bytes:
    """The kernel's C source at ``revision`` ("working": the working tree's file)."""
    if revision == "working":
        return (ROOT / KERNEL).read_bytes()
    return subprocess.run(["git", "show", f"{revision}:{KERNEL}"], cwd=ROOT, capture_output=True, check=True).stdout


class Scratch(threading.local):
    """Per-thread rows as large as the largest build asks for (fused_cpu sizes its own by the current build)."""

    entries = 0

    def address(self) -> int:
        if getattr(self, "rows", None) is None or self.rows.numel() < Scratch.entries + 8:
            self.rows = torch.empty(Scratch.entries + 8)
        return -(-self.rows.data_ptr() // 32) * 32


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, required=True, help="merge_vs_mergekit.py's --dir")
    parser.add_argument("--revisions", required=True, help="comma-separated git revisions, 'working' for the working tree")
    parser.add_argument("--models", type=int, default=8, help="K, the number of fine-tunes")
    parser.add_argument("--dtypes", default="float32,bfloat16,float16")
    parser.add_argument("--rounds", type=int, default=21)
    parser.add_argument("--anonymous", action="store_true", help="copy the checkpoints into anonymous memory first")
    args = parser.parse_args()
    revisions, names = args.revisions.split(","), args.dtypes.split(",")
    compiler = fused_cpu._compiler()
    if compiler is None:
        raise SystemExit("no C compiler found (set CC)")
    builds = {revision: fused_cpu._load(fused_cpu._build(source(revision), compiler)) for revision in revisions}
    Scratch.entries = max(build.clpeft_linear_merge_scratch() for build in builds.values())
    scratch = Scratch()
    fused_cpu._merge_scratch = scratch.address

    cases, outputs = {}, {}
    for name in names:
        base, *tuned = load(args.dir / name, args.models, args.anonymous)
        out = {n: torch.empty_like(t) for n, t in base.items()}
        gigabytes = (args.models + 2) * sum(t.numel() * t.element_size() for t in base.values()) / 1e9
        cases[name] = (kernel_merges(base, tuned, out), out, gigabytes)
    seconds = {(revision, name): [] for revision in revisions for name in names}
    for round_ in range(args.rounds):
        for revision, build in builds.items():
            fused_cpu._library = lambda build=build: build
            for name, (merges, out, _) in cases.items():
                start = time.perf_counter()
                fused_cpu.linear_merges(merges)
                seconds[revision, name].append(time.perf_counter() - start)
                if round_ == 0:
                    outputs[revision, name] = {n: t.clone() for n, t in out.items()}

    print(
        f"{time.strftime('%Y-%m-%d %H:%M %Z')}, torch {torch.__version__}, {torch.get_num_threads()} thread(s); K = {args.models}, "
        f"coefficient {SCALE}, {args.rounds} interleaved rounds; inputs {'in anonymous memory' if args.anonymous else 'memory-mapped'}"
    )
    first = revisions[0]
    print(f"| revision | dtype | median GB/s | best GB/s | speed vs {first} (median of rounds) | bits equal {first}'s |")
    print("|---|---|---|---|---|---|")
    for revision in revisions:
        for name in names:
            times, gigabytes = seconds[revision, name], cases[name][2]
            paired = statistics.median(a / b for a, b in zip(seconds[first, name], times))
            same = all(torch.equal(outputs[revision, name][n], t) for n, t in outputs[first, name].items())
            print(
                f"| {revision} | {name} | {gigabytes / statistics.median(times):.1f} | {gigabytes / min(times):.1f} | {paired:.3f}x | {same} |"
            )
    if "float32" in names:
        for revision in revisions:
            for name in names:
                if name != "float32":
                    per_byte = [
                        (cases[name][2] / t) / (cases["float32"][2] / f)
                        for t, f in zip(seconds[revision, name], seconds[revision, "float32"])
                    ]
                    print(f"{revision}: {name} / float32 speed per byte, median of rounds {statistics.median(per_byte):.3f}x")


if __name__ == "__main__":
    main()
