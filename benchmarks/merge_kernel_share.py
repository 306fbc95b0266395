"""A whole in-memory merge beside its compiled loops alone, on real checkpoints: what the engine adds.

``merge(base, tuned, "task_arithmetic", out=...)`` on the CPU spends its time in the compiled
loop (``clpeft/merging/linear_merge.c``) and around it: the plan and checks, views of every
tensor, the report. This script times, in one process and interleaved, on the checkpoints that
``benchmarks/merge_vs_mergekit.py --dir DIR`` writes (``DIR/<dtype>/base``, ``finetuned_<i>``,
memory-mapped by ``load_file`` as a user's merge reads them):

* ``kernel``: :func:`clpeft.merging.fused_cpu.linear_merges` on every tensor in one batch, the
  entries cut into one even span per torch thread (the loops and their thin Python wrapper,
  nothing else);
* ``merge``: the whole ``merge(..., out=...)`` into existing tensors;
* ``float32 kernel on the same bytes`` (bf16 / fp16 only): the float32 loop over the same memory, each
  tensor's bytes read as float32 (meaningless values, the same traffic): equal times mean the half-precision
  loop waits for memory, not for its conversions.

Printed per dtype: best wall seconds of ``--repeats`` and GB/s (the K + 2 tensors read and
written), the engine's share of the merge's time, and bf16 / fp16 speed per byte relative to
float32 for both (the issue-24 goal: at least 1.0x): best time to best time, and the median and
quartiles of each round's own ratio (the bandwidth of this VM drifts by more than the gap between
the dtypes: best-of figures taken minutes apart moved the ratio by +-5%). ``--anonymous`` copies the checkpoints into
anonymous memory first: each file's pages sit where the page cache put them, which alone moved a
dtype's speed per byte by 5-10% in one session.

Usage:
    python benchmarks/merge_vs_mergekit.py --size full --models 4 --repeats 1 --tools clpeft-memory-out --dir /tmp/mm
    OMP_NUM_THREADS=2 python benchmarks/merge_kernel_share.py --dir /tmp/mm --repeats 9 [--anonymous]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file

from clpeft.merging import fused_cpu, merge

SCALE = 0.3


def load(directory: Path, models: int, anonymous: bool) -> list[dict[str, torch.Tensor]]:
    """Base and fine-tunes, memory-mapped with every page faulted in (the clock measures merges, not first
    touches), or copied into anonymous memory."""
    states = [load_file(directory / name / "model.safetensors") for name in ["base", *[f"finetuned_{i}" for i in range(models)]]]
    for state in states:
        for tensor in state.values():
            tensor.view(-1)[::1024].sum()
    return [{n: t.clone() for n, t in state.items()} for state in states] if anonymous else states


def kernel_merges(base: dict, tuned: list[dict], out: dict, dtype: torch.dtype | None = None) -> list:
    """linear_merges()' merges: every tensor, flat; with ``dtype``, each tensor's bytes read as that dtype
    (its even-length prefix): the same memory traffic with another dtype's arithmetic."""

    def flat(t: torch.Tensor) -> torch.Tensor:
        t = t.view(-1)
        return t if dtype is None else t[: t.numel() // 2 * 2].view(dtype)

    coefficients = [SCALE] * len(tuned)
    return [(flat(t), [flat(m[n]) for m in tuned], coefficients, flat(out[n])) for n, t in base.items()]


def cases(directory: Path, models: int, anonymous: bool) -> tuple[int, float, dict[str, Callable[[], object]]]:
    """One dtype's checkpoints: its tensors, GB moved per merge, and its timed calls: the kernel alone, the
    merge, and for bf16 / fp16 the float32 kernel over the same bytes."""
    base, *tuned = load(directory, models, anonymous)
    out = {n: t.clone() for n, t in base.items()}
    merges = kernel_merges(base, tuned, out)
    runs = {"kernel": lambda: fused_cpu.linear_merges(merges), "merge": lambda: merge(base, tuned, "task_arithmetic", out=out, scale=SCALE)}
    if next(iter(base.values())).dtype != torch.float32:
        as_float32 = kernel_merges(base, tuned, out, torch.float32)
        runs["same bytes"] = lambda: fused_cpu.linear_merges(as_float32)
    return len(base), (models + 2) * sum(t.numel() * t.element_size() for t in base.values()) / 1e9, runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dir", type=Path, required=True, help="merge_vs_mergekit.py's --dir")
    parser.add_argument("--models", type=int, default=4, help="K, the number of fine-tunes")
    parser.add_argument("--dtypes", default="float32,bfloat16,float16")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument(
        "--anonymous",
        action="store_true",
        help="copy the checkpoints into anonymous memory (the page cache's layout of each file left out)",
    )
    args = parser.parse_args()
    if not fused_cpu.available():
        raise SystemExit("the C kernel is not available (no C compiler, or CLPEFT_CPU_KERNEL=0)")
    missing = [name for name in args.dtypes.split(",") if not (args.dir / name / "base" / "model.safetensors").is_file()]
    if missing:
        raise SystemExit(
            f"no {', '.join(missing)} checkpoints under {args.dir}: write them with merge_vs_mergekit.py --dir {args.dir} --dtypes ..."
        )
    print(
        f"{time.strftime('%Y-%m-%d %H:%M %Z')}, torch {torch.__version__}, {torch.get_num_threads()} thread(s); K = {args.models}, "
        f"best of {args.repeats}; inputs {'in anonymous memory' if args.anonymous else 'memory-mapped'}"
    )
    print(
        "| dtype | tensors | kernel s (GB/s) | merge s (GB/s) | engine's share of the merge | float32 kernel on the same bytes s (GB/s) |\n"
        "|---|---|---|---|---|---|"
    )
    names = args.dtypes.split(",")
    tensors, moved, runs = {}, {}, {}
    for name in names:
        tensors[name], moved[name], runs[name] = cases(args.dir / name, args.models, args.anonymous)
    times = {name: {label: [] for label in runs[name]} for name in names}
    for _ in range(args.repeats):  # every dtype's runs in each round: a change in the machine's bandwidth hits all alike
        for name in names:
            for label, run in runs[name].items():
                start = time.perf_counter()
                run()
                times[name][label].append(time.perf_counter() - start)
    for name in names:
        seconds, gb = {label: min(t) for label, t in times[name].items()}, moved[name]
        same_bytes = f"{seconds['same bytes']:.4f} ({gb / seconds['same bytes']:.1f})" if "same bytes" in seconds else "-"
        print(
            f"| {name} | {tensors[name]} | {seconds['kernel']:.4f} ({gb / seconds['kernel']:.1f}) | {seconds['merge']:.4f} "
            f"({gb / seconds['merge']:.1f}) | {1 - seconds['kernel'] / seconds['merge']:.0%} | {same_bytes} |"
        )
    for name in names:
        if name != "float32" and "float32" in names:
            print(f"{name} / float32 speed per byte: " + ", ".join(per_byte(times, moved, name, label) for label in ("kernel", "merge")))


def per_byte(times: dict, moved: dict, name: str, label: str) -> str:
    """``name``'s speed per byte over float32's for ``label``: the ratio of the best times, and the median and
    quartiles of the rounds' own ratios (each round's two runs a few tenths of a second apart)."""
    best = (moved[name] / min(times[name][label])) / (moved["float32"] / min(times["float32"][label]))
    rounds = [(moved[name] / t) / (moved["float32"] / f) for t, f in zip(times[name][label], times["float32"][label])]
    low, middle, high = statistics.quantiles(rounds, n=4) if len(rounds) > 1 else rounds * 3
    return f"{label} {best:.2f}x best to best, {middle:.3f}x median of rounds [quartiles {low:.3f}-{high:.3f}]"


if __name__ == "__main__":
    main()
