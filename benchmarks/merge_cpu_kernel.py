"""Would a compiled one-pass CPU kernel pay for linear merges? clpeft's blocks vs ``torch.compile``.

clpeft merges task arithmetic on the CPU one cached block of columns at a time
(:func:`clpeft.merging.blocks.combine_linear`): about ten ATen passes over each block (the
conversion and subtraction per model, the norms, ``mv``, the add). A fused kernel would make
one pass. This script measures what fusion would gain and what it costs, side by side in one
run: the same block arithmetic written once as a function and compiled by TorchInductor (its
C++ CPU backend, vectorised), against ``combine_linear`` on the same in-memory inputs.

Printed: CPU seconds per call (best of ``--repeats``), the speed-up, whether the merged
tensors are bit-identical, and the compile cost of the first call with an empty inductor
cache (cold) and again in a fresh process with the cache filled (warm). A compiled path only
pays when the merge saves more than the compile costs.

Usage:
    OMP_NUM_THREADS=1 python benchmarks/merge_cpu_kernel.py                 # ~1-2 minutes
    OMP_NUM_THREADS=1 python benchmarks/merge_cpu_kernel.py --numel 4194304 --repeats 3
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

import torch

from clpeft.merging.blocks import BLOCK_COLUMNS, combine_linear

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def fused_block(base: torch.Tensor, coefficients: torch.Tensor, *sources: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``combine_linear``'s arithmetic for one block as one function (what inductor fuses)."""
    theta0 = base.float()
    task_vectors = [s.float() - theta0 for s in sources]
    delta = coefficients[0] * task_vectors[0]
    for k in range(1, len(task_vectors)):
        delta = delta + coefficients[k] * task_vectors[k]
    sums = [theta0.square().sum(), delta.square().sum(), (delta != 0).sum().float()]
    sums += [t.square().sum() for t in task_vectors]
    return (theta0 + delta).to(base.dtype), torch.stack(sums)


def inputs(numel: int, models: int, dtype: torch.dtype) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    base = torch.randn(numel, generator=generator) * 0.02
    sources = [(base + torch.randn(numel, generator=generator) * 1e-3).to(dtype) for _ in range(models)]
    return base.to(dtype), sources, torch.full((models,), 0.3)


def first_call_seconds(numel: int, models: int, dtype: torch.dtype) -> float:
    """Wall seconds of the compiled function's first call on one block (compilation included)."""
    base, sources, coefficients = inputs(min(numel, BLOCK_COLUMNS), models, dtype)
    compiled = torch.compile(fused_block, dynamic=False)
    start = time.perf_counter()
    compiled(base, coefficients, *sources)
    return time.perf_counter() - start


def best_cpu_seconds(run, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.process_time()
        run()
        best = min(best, time.process_time() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--numel", type=int, default=1 << 25, help="entries per tensor")
    parser.add_argument("--models", type=int, default=4, help="K, the number of fine-tunes")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    cache = tempfile.mkdtemp(prefix="inductor_cache_")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache  # cold: nothing compiled yet
    print(
        f"{time.strftime('%Y-%m-%d %H:%M %Z')}, torch {torch.__version__}, {torch.get_num_threads()} thread(s), "
        f"CPU capability {torch.backends.cpu.get_cpu_capability()}; {args.numel:,} entries, K = {args.models}, "
        f"blocks of {BLOCK_COLUMNS:,} columns, best of {args.repeats}\n"
    )
    print("| dtype | combine_linear CPU s | compiled block CPU s | speed-up | bit-identical | first call cold s | first call warm s |")
    print("|---|---|---|---|---|---|---|")
    for name, dtype in DTYPES.items():
        cold = first_call_seconds(args.numel, args.models, dtype)
        warm_run = subprocess.run(
            [sys.executable, __file__, "--first-call", str(args.numel), str(args.models), name],
            capture_output=True,
            text=True,
            env={**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache},
            check=True,
        )
        warm = float(warm_run.stdout.strip().splitlines()[-1])
        base, sources, coefficients = inputs(args.numel, args.models, dtype)
        scratch = torch.empty(args.models + 2, min(args.numel, BLOCK_COLUMNS))
        ours = torch.empty(args.numel, dtype=dtype)
        blocks = torch.empty(args.numel, dtype=dtype)
        compiled = torch.compile(fused_block, dynamic=False)
        starts = range(0, args.numel, BLOCK_COLUMNS)

        def run_compiled() -> None:
            for start in starts:
                block = slice(start, start + BLOCK_COLUMNS)
                merged, _ = compiled(base[block], coefficients, *(s[block] for s in sources))
                blocks[block] = merged

        run_compiled()  # a ragged last block compiles once more here, outside the timing
        ours_s = best_cpu_seconds(lambda: combine_linear(base, sources, coefficients, ours, scratch), args.repeats)
        compiled_s = best_cpu_seconds(run_compiled, args.repeats)
        print(
            f"| {name} | {ours_s:.3f} | {compiled_s:.3f} | {ours_s / compiled_s:.2f}x | {torch.equal(ours, blocks)} "
            f"| {cold:.1f} | {warm:.1f} |"
        )


if __name__ == "__main__":
    if sys.argv[1:2] == ["--first-call"]:
        print(first_call_seconds(int(sys.argv[2]), int(sys.argv[3]), DTYPES[sys.argv[4]]))
    else:
        main()
