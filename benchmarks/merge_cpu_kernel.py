"""The CPU kernels for linear merges side by side: ATen blocks, the compiled C loop, TorchInductor.

clpeft merges task arithmetic on the CPU with a C loop compiled on first use
(:mod:`clpeft.merging.fused_cpu`), else one cached block of columns at a time with about ten
ATen passes per block (:func:`clpeft.merging.blocks.combine_linear`). This script times both
on the same inputs, into outputs that already exist (the arithmetic alone, no page faults of
fresh memory), against the machine's copy bandwidth measured in the same run, and checks that
their merged tensors are equal bit for bit. ``--from-file`` reads the inputs from safetensors
files (memory-mapped 4 KiB pages, as ``clpeft merge`` and ``load_file`` see them) instead of
anonymous memory. ``--inductor`` adds the same block arithmetic compiled by TorchInductor, with
its compile cost cold (empty cache) and warm (the reason it was not adopted).

Printed: wall seconds per merge (best of ``--repeats``), GB/s (the (K + 2) tensors read and
written), the share of the copy bandwidth (same thread count), the kernel's speed-up over ATen,
and bf16 / fp16 speed per byte relative to float32.

Usage:
    OMP_NUM_THREADS=1 python benchmarks/merge_cpu_kernel.py                   # ~1 minute
    OMP_NUM_THREADS=1 python benchmarks/merge_cpu_kernel.py --from-file --repeats 7
    OMP_NUM_THREADS=1 python benchmarks/merge_cpu_kernel.py --inductor          # + ~1 minute of compiling
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

import torch

from clpeft.merging import fused_cpu
from clpeft.merging.blocks import BLOCK_COLUMNS, combine_linear

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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


def best_seconds(run, repeats: int) -> float:
    """Best wall time of ``repeats`` calls after one untimed call."""
    run()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run()
        best = min(best, time.perf_counter() - start)
    return best


def copy_bandwidth(nbytes: int = 512 << 20) -> float:
    """GB/s of a memory copy with torch's thread count (bytes read plus written), best of 5."""
    source, target = torch.ones(nbytes, dtype=torch.uint8), torch.empty(nbytes, dtype=torch.uint8)
    return 2 * nbytes / best_seconds(lambda: target.copy_(source), 5) / 1e9


def mapped(tensors: list[torch.Tensor], directory: str) -> list[torch.Tensor]:
    """The tensors written to safetensors files and read back memory-mapped (pages faulted in)."""
    from safetensors.torch import load_file, save_file

    out = []
    for i, tensor in enumerate(tensors):
        path = os.path.join(directory, f"{i}.safetensors")
        save_file({"t": tensor}, path)
        loaded = load_file(path)["t"]
        loaded[::1024].sum()
        out.append(loaded)
    return out


def compiled_runner(base: torch.Tensor, sources: list[torch.Tensor], coefficients: torch.Tensor, out: torch.Tensor):
    """The block arithmetic compiled by TorchInductor, over the same blocks; (run, cold s, warm s)."""
    cache = tempfile.mkdtemp(prefix="inductor_cache_")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache  # cold: nothing compiled yet
    name = next(n for n, d in DTYPES.items() if d == base.dtype)
    cold = first_call_seconds(base.numel(), len(sources), base.dtype)
    warm_run = subprocess.run(
        [sys.executable, __file__, "--first-call", str(base.numel()), str(len(sources)), name],
        capture_output=True,
        text=True,
        env={**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache},
        check=True,
    )
    compiled = torch.compile(fused_block, dynamic=False)

    def run() -> None:
        for start in range(0, base.numel(), BLOCK_COLUMNS):
            block = slice(start, start + BLOCK_COLUMNS)
            out[block] = compiled(base[block], coefficients, *(s[block] for s in sources))[0]

    return run, cold, float(warm_run.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--numel", type=int, default=1 << 25, help="entries per tensor")
    parser.add_argument("--models", type=int, default=4, help="K, the number of fine-tunes")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--from-file", action="store_true", help="memory-mapped safetensors inputs")
    parser.add_argument("--inductor", action="store_true", help="add the TorchInductor-compiled block")
    args = parser.parse_args()
    if not fused_cpu.available():
        sys.exit("the C kernel is not available (no C compiler, or CLPEFT_CPU_KERNEL=0)")
    bandwidth = copy_bandwidth()
    print(
        f"{time.strftime('%Y-%m-%d %H:%M %Z')}, torch {torch.__version__}, {torch.get_num_threads()} thread(s), "
        f"CPU capability {torch.backends.cpu.get_cpu_capability()}; {args.numel:,} entries, K = {args.models}, "
        f"inputs {'memory-mapped from files' if args.from_file else 'in anonymous memory'}, best of {args.repeats}; "
        f"copy bandwidth {bandwidth:.1f} GB/s\n"
    )
    columns = ["dtype", "ATen blocks s", "C kernel s", "kernel GB/s (% of copy)", "speed-up", "bit-identical"]
    if args.inductor:
        columns += ["inductor s", "bit-identical", "inductor first call cold / warm s"]
    print("| " + " | ".join(columns) + " |\n|" + "---|" * len(columns))
    per_byte = {}
    with tempfile.TemporaryDirectory() as directory:
        for name, dtype in DTYPES.items():
            base, sources, coefficients = inputs(args.numel, args.models, dtype)
            if args.from_file:
                base, *sources = mapped([base, *sources], directory)
            scratch = torch.empty(args.models + 2, min(args.numel, BLOCK_COLUMNS))
            aten, kernel = torch.empty_like(base), torch.empty_like(base)
            aten_s = best_seconds(lambda: combine_linear(base, sources, coefficients, aten, scratch), args.repeats)
            kernel_s = best_seconds(lambda: fused_cpu.linear_merge(base, sources, coefficients.tolist(), kernel), args.repeats)
            gbs = (args.models + 2) * args.numel * dtype.itemsize / kernel_s / 1e9
            per_byte[name] = gbs
            row = [name, f"{aten_s:.3f}", f"{kernel_s:.3f}", f"{gbs:.1f} ({gbs / bandwidth:.0%})", f"{aten_s / kernel_s:.2f}x"]
            row.append(
                str(
                    torch.equal(
                        aten.view(torch.int16 if dtype.itemsize == 2 else torch.int32),
                        kernel.view(torch.int16 if dtype.itemsize == 2 else torch.int32),
                    )
                )
            )
            if args.inductor:
                blocks = torch.empty_like(base)
                run, cold, warm = compiled_runner(base, sources, coefficients, blocks)
                row += [f"{best_seconds(run, args.repeats):.3f}", str(torch.equal(aten, blocks)), f"{cold:.1f} / {warm:.1f}"]
            print("| " + " | ".join(row) + " |", flush=True)
    for name in ("bfloat16", "float16"):
        print(f"C kernel {name} / float32 speed per byte: {per_byte[name] / per_byte['float32']:.2f}x")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--first-call"]:
        print(first_call_seconds(int(sys.argv[2]), int(sys.argv[3]), DTYPES[sys.argv[4]]))
    else:
        main()
