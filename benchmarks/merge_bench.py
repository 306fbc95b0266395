"""Streaming merge vs. the load-everything baseline: wall time, CPU time, peak RSS, equality.

K synthetic fine-tunes of a ViT-B/16-shaped fp32 model (86.6M parameters, 12 blocks, width
768, 1000-class head) are written as safetensors files. Each variant then runs in its own
subprocess so that its peak resident memory (``VmHWM``) is its own:

* ``baseline``: what users write today: ``safetensors.torch.load_file`` for every checkpoint,
  then ``peft.utils.merge_utils`` per tensor, then ``save_file``;
* ``clpeft``: :func:`clpeft.merging.merge_files` (positioned reads, in-place math, own
  incremental writer);
* ``baseline-memory`` and ``clpeft-memory``: the same two with every checkpoint already in
  ``--device`` memory (loaded before the clock starts, the output left there): peft per tensor
  vs :func:`clpeft.merging.merge`. On a GPU this is the merge's own speed against the device's
  memory bandwidth, with no disk or host copies in the way; ``clpeft-memory-opbyop`` is the
  same merge with the one-pass kernel for linear methods switched off (``merge(..., fused=False)``).

TIES runs three ways for clpeft: ``ties/clpeft`` with the default ``trim_scope: model`` (the
official code's trim over the whole flattened model: a streamed two-sweep threshold selection,
then the merge), ``ties-tensor/clpeft`` trimming each tensor apart (peft's scope, the same tie
convention), and ``ties-topk/clpeft`` per tensor with peft's exact ``topk`` convention. The
model-scope run differs from peft's per-tensor baseline by design; the table's last line gives
its cost against the per-tensor run (wall time and peak memory ratios).

Timings cover the merge only (inputs on disk to output on disk), not interpreter start or
imports. Before each case the driver calls ``sync``, so no case runs while the previous case's
output is still being written back (each merge still pays for writing its own); peak RSS is the whole process's (imports included, reported separately). Outputs
are compared tensor by tensor. TIES runs twice for clpeft: with the default ``threshold``
trim and with ``topk``, the convention peft uses (see clpeft/merging/methods/sparsify.py).

Usage:
    python benchmarks/merge_bench.py                 # full size, K = 8 (minutes; ~3.5 GB of files)
    python benchmarks/merge_bench.py --size small    # seconds
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

SIZES = {"full": {"width": 768, "depth": 12, "classes": 1000}, "small": {"width": 192, "depth": 4, "classes": 100}}
CASES = {  # name -> (variant, method, parameters)
    "ta/baseline": ("baseline", "task_arithmetic", {"scale": 0.3}),
    "ta/clpeft": ("clpeft", "task_arithmetic", {"scale": 0.3}),
    "ties/baseline": ("baseline", "ties", {"density": 0.2, "scale": 1.0}),
    "ties/clpeft": ("clpeft", "ties", {"density": 0.2, "scale": 1.0, "trim_scope": "model"}),
    "ties-tensor/clpeft": ("clpeft", "ties", {"density": 0.2, "scale": 1.0, "trim_scope": "tensor"}),
    "ties-topk/clpeft": ("clpeft", "ties", {"density": 0.2, "scale": 1.0, "trim_scope": "tensor", "trim": "topk"}),
    "ta/baseline-memory": ("baseline-memory", "task_arithmetic", {"scale": 0.3}),
    "ta/clpeft-memory": ("clpeft-memory", "task_arithmetic", {"scale": 0.3}),
    "ta/clpeft-memory-opbyop": ("clpeft-memory-opbyop", "task_arithmetic", {"scale": 0.3}),
}
DEFAULT_CASES = [case for case in CASES if not case.endswith("-memory")]


def vit_shapes(width: int, depth: int, classes: int, patch: int = 16, tokens: int = 197) -> dict[str, tuple[int, ...]]:
    """Parameter shapes of a timm ``vit_base_patch16_224``-like model."""
    shapes = {
        "cls_token": (1, 1, width),
        "pos_embed": (1, tokens, width),
        "patch_embed.proj.weight": (width, 3, patch, patch),
        "patch_embed.proj.bias": (width,),
    }
    for i in range(depth):
        b = f"blocks.{i}."
        shapes |= {
            b + "norm1.weight": (width,),
            b + "norm1.bias": (width,),
            b + "attn.qkv.weight": (3 * width, width),
            b + "attn.qkv.bias": (3 * width,),
            b + "attn.proj.weight": (width, width),
            b + "attn.proj.bias": (width,),
            b + "norm2.weight": (width,),
            b + "norm2.bias": (width,),
            b + "mlp.fc1.weight": (4 * width, width),
            b + "mlp.fc1.bias": (4 * width,),
            b + "mlp.fc2.weight": (width, 4 * width),
            b + "mlp.fc2.bias": (width,),
        }
    return shapes | {
        "norm.weight": (width,),
        "norm.bias": (width,),
        "head.weight": (classes, width),
        "head.bias": (classes,),
    }


def write_models(directory: Path, size: str, k: int) -> tuple[Path, list[Path], int]:
    """Base ~ N(0, 0.02); fine-tune j = base + N(0, 1e-3), all fp32 (so deltas carry fp32 rounding ties)."""
    from safetensors.torch import save_file

    shapes = vit_shapes(**SIZES[size])
    generator = torch.Generator().manual_seed(0)
    base = {name: torch.randn(shape, generator=generator) * 0.02 for name, shape in shapes.items()}
    base_path = directory / "base.safetensors"
    save_file(base, base_path)
    paths = []
    for j in range(k):
        finetuned = {name: t + torch.randn(t.shape, generator=generator) * 1e-3 for name, t in base.items()}
        paths.append(directory / f"finetuned_{j}.safetensors")
        save_file(finetuned, paths[-1])
    return base_path, paths, sum(t.numel() for t in base.values())


# ----------------------------------------------------------------------------- workers


def peft_merge(base: dict, finetuned: list[dict], method: str, params: dict) -> dict:
    """``peft.utils.merge_utils`` per tensor, where the tensors are."""
    from peft.utils import merge_utils

    scale = torch.full((len(finetuned),), float(params["scale"]), device=next(iter(base.values())).device)
    merged = {}
    for name, b in base.items():
        task_vectors = [f[name] - b for f in finetuned]
        if method == "ties":
            delta = merge_utils.ties(task_vectors, scale, params["density"])
        else:
            delta = merge_utils.task_arithmetic(task_vectors, scale)
        merged[name] = b + delta
    return merged


def run_baseline(base_path: str, paths: list[str], out: str, method: str, params: dict, device: str) -> tuple[float, float]:
    from safetensors.torch import load_file, save_file

    start_wall, start_cpu = time.perf_counter(), time.process_time()
    save_file(peft_merge(load_file(base_path), [load_file(p) for p in paths], method, params), out)
    return time.perf_counter() - start_wall, time.process_time() - start_cpu


def run_in_memory(
    base_path: str, paths: list[str], out: str, method: str, params: dict, device: str, *, library: str, fused: bool = True
) -> tuple[float, float]:
    """Time one merge of checkpoints already in ``device`` memory; save the result untimed."""
    from safetensors.torch import load_file, save_file

    from clpeft.merging import merge

    base, finetuned = load_file(base_path, device=device), [load_file(p, device=device) for p in paths]
    _synchronize(device)
    start_wall, start_cpu = time.perf_counter(), time.process_time()
    if library == "peft":
        merged = peft_merge(base, finetuned, method, params)
    else:
        merged = merge(base, finetuned, method, device=device, fused=fused, **params)
    _synchronize(device)
    wall, cpu = time.perf_counter() - start_wall, time.process_time() - start_cpu
    save_file({name: t.cpu() for name, t in merged.items()}, out)
    return wall, cpu


def _synchronize(device: str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def run_clpeft(base_path: str, paths: list[str], out: str, method: str, params: dict, device: str) -> tuple[float, float]:
    from clpeft.merging import merge_files

    start_wall, start_cpu = time.perf_counter(), time.process_time()
    merge_files(base_path, paths, out, method, device=device, **params)
    return time.perf_counter() - start_wall, time.process_time() - start_cpu


def worker(case: str, threads: int, device: str, base: str, out: str, paths: list[str]) -> None:
    """Run one case and print its measurements as one JSON line."""
    if threads:
        torch.set_num_threads(threads)
    import_rss = _peak_rss_gib()
    variant, method, params = CASES[case]
    if variant.startswith("baseline"):
        import peft.utils.merge_utils  # noqa: F401  (imported before the clock starts, as clpeft is)
    run = {
        "baseline": run_baseline,
        "clpeft": run_clpeft,
        "baseline-memory": functools.partial(run_in_memory, library="peft"),
        "clpeft-memory": functools.partial(run_in_memory, library="clpeft"),
        "clpeft-memory-opbyop": functools.partial(run_in_memory, library="clpeft", fused=False),
    }[variant]
    before = resource.getrusage(resource.RUSAGE_SELF)
    wall, cpu = run(base, paths, out, method, params, device)
    after = resource.getrusage(resource.RUSAGE_SELF)
    print(
        json.dumps(
            {
                "wall_s": wall,
                "cpu_s": cpu,
                "system_s": after.ru_stime - before.ru_stime,  # kernel share: page faults, copies, writeback
                "major_faults": after.ru_majflt - before.ru_majflt,  # pages that had to come from disk
                "peak_rss_gib": _peak_rss_gib(),
                "import_rss_gib": import_rss,
            }
        )
    )


def _peak_rss_gib() -> float:
    """This process's peak resident set (VmHWM). Not ``ru_maxrss``: Linux carries that over
    from the parent's image across fork + exec, so a child would inherit the driver's peak."""
    status = Path("/proc/self/status").read_text()
    kib = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:"))
    return kib / 2**20


# ----------------------------------------------------------------------------- driver


def compare(a: Path, b: Path) -> dict:
    """Max |a - b| over all tensors, and the fractions of entries that differ at all and by more than 1e-6."""
    from safetensors import safe_open

    worst, differing, far, total = 0.0, 0, 0, 0
    with safe_open(a, "pt") as fa, safe_open(b, "pt") as fb:
        assert set(fa.keys()) == set(fb.keys()), "different tensor names"
        for name in fa.keys():
            difference = (fa.get_tensor(name) - fb.get_tensor(name)).abs()
            worst = max(worst, float(difference.max()))
            differing += int(torch.count_nonzero(difference))
            far += int(torch.count_nonzero(difference > 1e-6))  # beyond fp32 rounding of ~0.02-sized weights
            total += difference.numel()
    return {"max_abs_diff": worst, "fraction_differing": differing / total, "fraction_beyond_rounding": far / total}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="full")
    parser.add_argument("--models", type=int, default=8, help="K, the number of fine-tunes")
    parser.add_argument("--cases", default=",".join(DEFAULT_CASES), help=f"comma-separated subset of {', '.join(CASES)}")
    parser.add_argument("--repeats", type=int, default=1, help="runs per case, interleaved; the table shows the best")
    parser.add_argument("--threads", type=int, default=0, help="torch threads in every variant (default: torch's default)")
    parser.add_argument("--device", default="cpu", help="where clpeft merges (the baseline always runs on the CPU)")
    parser.add_argument("--dir", type=Path, help="where to write the checkpoints (default: a temporary directory)")
    args = parser.parse_args()

    directory = Path(tempfile.mkdtemp(prefix="merge_bench_", dir=args.dir))
    try:
        t = time.perf_counter()
        base, paths, numel = write_models(directory, args.size, args.models)
        print(f"wrote base + {args.models} fine-tunes of {numel / 1e6:.1f}M parameters in {time.perf_counter() - t:.0f} s")
        runs: dict[str, list[dict]] = {case: [] for case in args.cases.split(",")}
        load = [os.getloadavg()[0]]
        for _ in range(args.repeats):
            for case in runs:
                out = directory / f"{case.replace('/', '_')}.safetensors"
                command = [sys.executable, __file__, "--worker", case, str(args.threads), args.device, str(base)]
                command += [str(out), *map(str, paths)]
                env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1]), "HF_HUB_OFFLINE": "1"}
                os.sync()  # the previous case's output is on disk: no case runs during another's writeback
                done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
                if done.returncode:
                    sys.exit(f"{case} failed:\n{done.stderr}")
                runs[case].append(json.loads(done.stdout.strip().splitlines()[-1]))
                print(case, runs[case][-1], flush=True)
        load.append(os.getloadavg()[0])
        best = {
            case: {
                "wall_s": min(r["wall_s"] for r in rs),
                "cpu_s": min(r["cpu_s"] for r in rs),
                "peak_rss_gib": max(r["peak_rss_gib"] for r in rs),
                "import_rss_gib": max(r["import_rss_gib"] for r in rs),
            }
            for case, rs in runs.items()
        }
        print_table(best, directory, args, load, traffic=(args.models + 2) * numel * 4)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def copy_bandwidths(device: str, nbytes: int = 1 << 30) -> dict[str, float]:
    """GB/s of the two copies a GPU merge's bytes take, measured here as references for its GB/s:
    pinned host memory to the device, and device memory to device memory (bytes read plus
    written, as the merge's traffic is counted). Best of 5 after a warm-up."""
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    source, target = torch.empty(nbytes, dtype=torch.uint8, device=device), torch.empty(nbytes, dtype=torch.uint8, device=device)
    result = {}
    for name, copy, moved in [
        ("host_to_device", lambda: source.copy_(host, non_blocking=True), nbytes),
        ("device_to_device", lambda: target.copy_(source), 2 * nbytes),
    ]:
        copy()
        torch.cuda.synchronize()
        best = float("inf")
        for _ in range(5):
            start = time.perf_counter()
            copy()
            torch.cuda.synchronize()
            best = min(best, time.perf_counter() - start)
        result[name] = moved / best / 1e9
    return result


def print_table(results: dict, directory: Path, args: argparse.Namespace, load: list[float], traffic: int) -> None:
    """The results as a markdown table; ``traffic`` is the bytes read and written by one merge."""
    threads = args.threads or torch.get_num_threads()
    print(f"\nmachine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, {threads} torch threads")
    if args.device.startswith("cuda"):
        bandwidth = copy_bandwidths(args.device)
        print(
            f"GPU: {torch.cuda.get_device_name(args.device)}; copies measured now: pinned host -> device "
            f"{bandwidth['host_to_device']:.1f} GB/s, device -> device {bandwidth['device_to_device']:.0f} GB/s "
            "(the merge's GB/s below divided by these is its share of each)"
        )
    print(f"load average (1 min) before/after: {load[0]:.1f} / {load[1]:.1f}")
    print(
        f"command: python benchmarks/merge_bench.py --size {args.size} --models {args.models} "
        f"--threads {args.threads} --repeats {args.repeats} --device {args.device}"
    )
    print(f"best of {args.repeats} runs per case (wall and CPU time minimised separately, peak RSS maximised)")
    print(f"GB/s: the {traffic / 1e9:.2f} GB one merge reads and writes ((K + 2) models) per wall second\n")
    columns = ["method", "variant", "wall s", "CPU s", "GB/s", "peak RSS GiB (after imports)", "speed-up wall / CPU"]
    columns += ["RSS vs baseline", "vs baseline: max abs diff; entries differing; beyond 1e-6"]
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for case, r in results.items():
        family, variant = case.split("/")
        baseline = f"{family.split('-')[0]}/{'baseline-memory' if '-memory' in variant else 'baseline'}"
        reference = results.get(baseline)
        speedup = memory = equal = "-"
        if not variant.startswith("baseline") and reference:
            speedup = f"{reference['wall_s'] / r['wall_s']:.2f}x / {reference['cpu_s'] / r['cpu_s']:.2f}x"
            memory = f"{r['peak_rss_gib'] / reference['peak_rss_gib']:.2f}x"
            mine = directory / f"{case.replace('/', '_')}.safetensors"
            theirs = directory / f"{baseline.replace('/', '_')}.safetensors"
            d = compare(mine, theirs)
            equal = f"{d['max_abs_diff']:.1e}; {d['fraction_differing']:.2%}; {d['fraction_beyond_rounding']:.4%}"
        rss = f"{r['peak_rss_gib']:.2f} ({r['import_rss_gib']:.2f})"
        row = [family, variant, f"{r['wall_s']:.1f}", f"{r['cpu_s']:.1f}", f"{traffic / 1e9 / r['wall_s']:.2f}", rss]
        print("| " + " | ".join([*row, speedup, memory, equal]) + " |")
    model, tensor = results.get("ties/clpeft"), results.get("ties-tensor/clpeft")
    if model and tensor:
        print(
            f"\nTIES trim_scope model vs tensor: wall {model['wall_s'] / tensor['wall_s']:.2f}x, "
            f"CPU {model['cpu_s'] / tensor['cpu_s']:.2f}x, peak RSS {model['peak_rss_gib'] / tensor['peak_rss_gib']:.2f}x"
        )


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        worker(sys.argv[2], int(sys.argv[3]), sys.argv[4], sys.argv[5], sys.argv[6], sys.argv[7:])
    else:
        main()
