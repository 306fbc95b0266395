"""A whole in-memory merge beside its compiled loops alone, on real checkpoints: what the engine adds.

``merge(base, tuned, "task_arithmetic", out=...)`` on the CPU spends its time in the compiled
loop (``clpeft/merging/linear_merge.c``) and around it: the plan and checks, views of every
tensor, the report. This script times, in one process and interleaved, on the checkpoints that
``benchmarks/merge_vs_mergekit.py --dir DIR`` writes (``DIR/<dtype>/base``, ``finetuned_<i>``,
memory-mapped by ``load_file`` as a user's merge reads them):

* ``kernel``: :func:`clpeft.merging.fused_cpu.linear_merge` on every tensor, the tensors shared
  between the torch threads by :func:`~clpeft.merging.fused_cpu.share` in one batch (the loops and
  their thin Python wrapper, nothing else);
* ``merge``: the whole ``merge(..., out=...)`` into existing tensors.

Printed per dtype: best wall seconds of ``--repeats`` and GB/s (the K + 2 tensors read and
written), the engine's share of the merge's time, and bf16 / fp16 speed per byte relative to
float32 for both (the issue-24 goal: at least 1.0x).

Usage:
    python benchmarks/merge_vs_mergekit.py --size full --models 4 --repeats 1 --tools clpeft-memory-out --dir /tmp/mm
    OMP_NUM_THREADS=2 python benchmarks/merge_kernel_share.py --dir /tmp/mm --repeats 9
"""

from __future__ import annotations

import argparse
import functools
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from clpeft.merging import fused_cpu, merge

SCALE = 0.3


def load(directory: Path, models: int) -> list[dict[str, torch.Tensor]]:
    """Base and fine-tunes, memory-mapped, every page faulted in (the clock measures merges, not first touches)."""
    states = [load_file(directory / name / "model.safetensors") for name in ["base", *[f"finetuned_{i}" for i in range(models)]]]
    for state in states:
        for tensor in state.values():
            tensor.view(-1)[::1024].sum()
    return states


def measure(directory: Path, models: int, repeats: int) -> tuple[int, float, dict[str, float]]:
    """One dtype's checkpoints: (tensors, GB moved per merge, best seconds of the kernel alone and of the merge)."""
    base, *tuned = load(directory, models)
    out = {n: t.clone() for n, t in base.items()}
    coefficients = [SCALE] * models
    tasks = [
        (t.numel(), functools.partial(fused_cpu.linear_merge, t.view(-1), [m[n].view(-1) for m in tuned], coefficients, out[n].view(-1)))
        for n, t in base.items()
    ]
    runs = {"kernel": lambda: fused_cpu.share(tasks), "merge": lambda: merge(base, tuned, "task_arithmetic", out=out, scale=SCALE)}
    best = dict.fromkeys(runs, float("inf"))
    for _ in range(repeats):
        for label, run in runs.items():
            start = time.perf_counter()
            run()
            best[label] = min(best[label], time.perf_counter() - start)
    moved = (models + 2) * sum(t.numel() * t.element_size() for t in base.values()) / 1e9
    return len(base), moved, best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, required=True, help="merge_vs_mergekit.py's --dir")
    parser.add_argument("--models", type=int, default=4, help="K, the number of fine-tunes")
    parser.add_argument("--dtypes", default="float32,bfloat16,float16")
    parser.add_argument("--repeats", type=int, default=9)
    args = parser.parse_args()
    if not fused_cpu.available():
        raise SystemExit("the C kernel is not available (no C compiler, or CLPEFT_CPU_KERNEL=0)")
    missing = [name for name in args.dtypes.split(",") if not (args.dir / name / "base" / "model.safetensors").is_file()]
    if missing:
        raise SystemExit(
            f"no {', '.join(missing)} checkpoints under {args.dir}: write them with merge_vs_mergekit.py --dir {args.dir} --dtypes ..."
        )
    print(
        f"{time.strftime('%Y-%m-%d %H:%M %Z')}, torch {torch.__version__}, {torch.get_num_threads()} thread(s); K = {args.models}, best of {args.repeats}"
    )
    print("| dtype | tensors | kernel s (GB/s) | merge s (GB/s) | engine's share of the merge |\n|---|---|---|---|---|")
    rates: dict[str, tuple[float, float]] = {}
    for name in args.dtypes.split(","):
        tensors, moved, best = measure(args.dir / name, args.models, args.repeats)
        rates[name] = (moved / best["kernel"], moved / best["merge"])
        print(
            f"| {name} | {tensors} | {best['kernel']:.4f} ({rates[name][0]:.1f}) | {best['merge']:.4f} ({rates[name][1]:.1f}) "
            f"| {1 - best['kernel'] / best['merge']:.0%} |",
            flush=True,
        )
    for name in rates:
        if name != "float32" and "float32" in rates:
            kernel, whole = (rates[name][i] / rates["float32"][i] for i in range(2))
            print(f"{name} / float32 speed per byte: kernel {kernel:.2f}x, merge {whole:.2f}x")


if __name__ == "__main__":
    main()
