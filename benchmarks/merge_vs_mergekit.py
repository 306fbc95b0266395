"""clpeft vs mergekit on Llama-shaped checkpoints: wall time, peak RSS, accuracy, copy bandwidth.

K synthetic fine-tunes of a Llama-shaped model (``--size full``: 134M parameters, hidden 768,
12 layers, intermediate 2048, vocabulary 32000, untied head; ``--size 7b-layer``: the tensor
shapes of a 7B Llama, hidden 4096 and intermediate 11008, one layer and an 8,000-entry
vocabulary, 267M parameters) are written once per dtype asked for (float32, bfloat16, float16)
as transformers-style directories (``config.json`` + ``model.safetensors``).
Fine-tune ``k`` is ``base + N(0, 1e-3)`` over a ``N(0, 0.02)`` base, rounded to the dtype.

Cases, each in its own subprocess so that its peak resident memory (``VmHWM``) is its own, and
run in interleaved order (every case once, then every case again) so that a change in the
shared machine's load hits all of them alike:

* ``mergekit``: ``mergekit.merge.run_merge`` with ``lazy_unpickle`` (``mergekit-yaml
  --lazy-unpickle``) on the CPU, output dtype = input dtype;
* ``clpeft``: :func:`clpeft.merging.merge_files`, file to file;
* ``clpeft-memory``: :func:`clpeft.merging.merge` on checkpoints loaded before the clock starts:
  the merge's own speed, into fresh tensors (compared with the clone bandwidth below);
* ``clpeft-memory-out``: the same into existing tensors (``merge(..., out=...)``, clones of the
  base made before the clock starts), compared with the copy bandwidth below;
* ``clpeft-other``, ``clpeft-other-memory-out``: ``clpeft`` and ``clpeft-memory-out`` run from
  another checkout (``--other-clpeft DIR``, e.g. a ``git archive`` of an older commit), for
  before/after timings in the same run;
* ``clpeft-aten``, ``clpeft-memory-aten``: ``clpeft`` and ``clpeft-memory`` with the compiled
  CPU kernel for linear merges switched off (``CLPEFT_CPU_KERNEL=0``: ATen ops in cached
  blocks), for the kernel's gain in the same run.

Methods: task arithmetic (``lambda = 0.3``: mergekit ``weight: 0.3`` per model) and TIES
(density 0.2, ``lambda = 1``; mergekit ``weight: 1``, its default ``normalize: true``, i.e.
the disjoint mean; clpeft ``trim_scope: tensor``, mergekit's per-tensor trim); ``ties_model``:
clpeft's TIES with the official code's trim over the whole model (clpeft's default; no mergekit
counterpart, no float64 reference in the table).

Printed in the same run: the machine's copy bandwidth (``torch`` copy of a 512 MiB buffer with
the merges' thread count, ``OMP_NUM_THREADS``; bytes read plus written per second, best of 5), the 1-minute load average before each
measured run, and, per method and dtype, the entries of layer 0 that differ from a float64
computation on the same inputs rounded once to the output dtype (TIES' float64 reference trims
with clpeft's threshold convention, so mergekit's ``topk`` convention shows up there as well).

mergekit is a benchmark extra (``pip install -e .[bench]``); without it the mergekit cases are
skipped, or point ``--mergekit-python`` at an interpreter that has it.

Usage:
    python benchmarks/merge_vs_mergekit.py --models 4 --repeats 3      # ~10 minutes, ~4 GB of files
    python benchmarks/merge_vs_mergekit.py --size small --repeats 1    # seconds
    mkdir /tmp/before && git archive <commit> clpeft strategies scenarios | tar -x -C /tmp/before
    python benchmarks/merge_vs_mergekit.py --tools clpeft,clpeft-other --other-clpeft /tmp/before
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

SIZES = {  # Llama shapes; "full" is 134M parameters, "7b-layer" one Llama-2-7B decoder layer (267M with an 8,000-entry vocabulary)
    "full": {"hidden": 768, "layers": 12, "intermediate": 2048, "vocab": 32000},
    "7b-layer": {"hidden": 4096, "layers": 1, "intermediate": 11008, "vocab": 8000},
    "small": {"hidden": 128, "layers": 2, "intermediate": 344, "vocab": 1000},
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
HALF = ("bfloat16", "float16")  # compared per byte with float32
METHODS = {  # name -> (clpeft method and parameters, mergekit method, per-model and global parameters)
    "task_arithmetic": (("task_arithmetic", {"scale": 0.3}), ("task_arithmetic", {"weight": 0.3}, {})),
    "ties": (
        ("ties", {"density": 0.2, "scale": 1.0, "trim_scope": "tensor"}),
        ("ties", {"weight": 1.0, "density": 0.2}, {"normalize": True}),
    ),
    # the official code's trim over the whole model (clpeft's default); mergekit has no such trim
    "ties_model": (("ties", {"density": 0.2, "scale": 1.0, "trim_scope": "model"}), None),
}
TOOLS = [
    "mergekit",
    "clpeft",
    "clpeft-memory",
    "clpeft-memory-out",
    "clpeft-other",
    "clpeft-other-memory-out",
    "clpeft-aten",
    "clpeft-memory-aten",
]
OTHER = {"clpeft": "clpeft-other", "clpeft-memory-out": "clpeft-other-memory-out"}  # tool -> its other-checkout twin


def llama_shapes(hidden: int, layers: int, intermediate: int, vocab: int) -> dict[str, tuple[int, ...]]:
    """Parameter names and shapes of ``LlamaForCausalLM`` (multi-head attention, untied head)."""
    shapes = {"model.embed_tokens.weight": (vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        shapes |= {p + f"self_attn.{n}.weight": (hidden, hidden) for n in ("q_proj", "k_proj", "v_proj", "o_proj")}
        shapes |= {
            p + "mlp.gate_proj.weight": (intermediate, hidden),
            p + "mlp.up_proj.weight": (intermediate, hidden),
            p + "mlp.down_proj.weight": (hidden, intermediate),
            p + "input_layernorm.weight": (hidden,),
            p + "post_attention_layernorm.weight": (hidden,),
        }
    return shapes | {"model.norm.weight": (hidden,), "lm_head.weight": (vocab, hidden)}


def write_models(directory: Path, size: str, k: int, dtypes: list[str]) -> dict[str, tuple[Path, list[Path]]]:
    """Base and K fine-tunes in each of ``dtypes``, each a directory with config.json and model.safetensors
    (``directory/<dtype>/base``, ``finetuned_<i>``). A dtype whose folder a run with the same size and K
    completed (``written.json``) is kept as it is, not written again."""
    from safetensors.torch import save_file

    dims = SIZES[size]
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": dims["hidden"],
        "intermediate_size": dims["intermediate"],
        "num_hidden_layers": dims["layers"],
        "num_attention_heads": dims["hidden"] // 64,
        "num_key_value_heads": dims["hidden"] // 64,
        "vocab_size": dims["vocab"],
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": False,
        "hidden_act": "silu",
    }
    generator = torch.Generator().manual_seed(0)
    base = {name: torch.randn(shape, generator=generator) * 0.02 for name, shape in llama_shapes(**dims).items()}
    states = [base] + [{n: t + torch.randn(t.shape, generator=generator) * 1e-3 for n, t in base.items()} for _ in range(k)]
    models = {}
    for dtype_name in dtypes:
        dtype, folder = DTYPES[dtype_name], directory / dtype_name
        paths = [folder / ("base" if i == 0 else f"finetuned_{i - 1}") for i in range(k + 1)]
        models[dtype_name] = (paths[0], paths[1:])
        marker, written = folder / "written.json", {"size": size, "models": k}
        if marker.is_file() and json.loads(marker.read_text()) == written:
            continue
        shutil.rmtree(folder, ignore_errors=True)
        for path, state in zip(paths, states, strict=True):
            path.mkdir(parents=True)
            (path / "config.json").write_text(json.dumps({**config, "torch_dtype": dtype_name}))
            save_file({n: t.to(dtype).contiguous() for n, t in state.items()}, path / "model.safetensors", metadata={"format": "pt"})
        marker.write_text(json.dumps(written))
    return models


# ----------------------------------------------------------------------------- workers


def run_mergekit(base: Path, paths: list[Path], out: Path, method: str, dtype: str) -> None:
    import yaml
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    name, per_model, global_params = METHODS[method][1]
    config = {
        "merge_method": name,
        "base_model": str(base),
        "dtype": dtype,
        "parameters": global_params,
        "models": [{"model": str(p), "parameters": per_model} for p in paths],
    }
    merge_config = MergeConfiguration.model_validate(yaml.safe_load(yaml.safe_dump(config)))
    options = MergeOptions(lazy_unpickle=True, copy_tokenizer=False, write_model_card=False, quiet=True)
    run_merge(merge_config, str(out), options)


def run_clpeft(base: Path, paths: list[Path], out: Path, method: str, dtype: str) -> None:
    from clpeft.merging import merge_files

    name, params = METHODS[method][0]
    out.mkdir()
    merge_files(base, paths, out / "model.safetensors", name, **params)


def worker(tool: str, method: str, dtype: str, out: str, base: str, paths: list[str]) -> None:
    """Run one case and print its measurements as one JSON line (imports are not timed)."""
    base_path, model_paths, out_path = Path(base), [Path(p) for p in paths], Path(out)
    if tool == "mergekit":
        import mergekit.merge  # noqa: F401

        run = run_mergekit
    elif tool in ("clpeft", "clpeft-other", "clpeft-aten"):
        import clpeft.merging  # noqa: F401

        run = run_clpeft
    else:
        return _memory_worker(method, base_path, model_paths, out_path, into_existing=tool.endswith("memory-out"))
    start_wall, start_cpu = time.perf_counter(), time.process_time()
    run(base_path, model_paths, out_path, method, dtype)
    _report(time.perf_counter() - start_wall, time.process_time() - start_cpu)


def _memory_worker(method: str, base: Path, paths: list[Path], out: Path, into_existing: bool) -> None:
    """clpeft's in-memory merge of checkpoints loaded before the clock starts, into fresh tensors or
    (``into_existing``) into clones of the base made before it; saved untimed."""
    from safetensors.torch import load_file, save_file

    from clpeft.merging import merge

    name, params = METHODS[method][0]
    loaded = [load_file(p / "model.safetensors") for p in [base, *paths]]
    for state in loaded:  # fault the pages in: the clock measures the merge, not the first touch
        for t in state.values():
            t.view(-1)[::1024].sum()
    destinations = {n: t.clone() for n, t in loaded[0].items()} if into_existing else None
    start_wall, start_cpu = time.perf_counter(), time.process_time()
    merged = merge(loaded[0], loaded[1:], name, out=destinations, **params)
    wall, cpu = time.perf_counter() - start_wall, time.process_time() - start_cpu
    out.mkdir()
    save_file(merged, out / "model.safetensors")
    _report(wall, cpu)


def _report(wall: float, cpu: float) -> None:
    status = Path("/proc/self/status").read_text()
    kib = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:"))
    print(json.dumps({"wall_s": wall, "cpu_s": cpu, "peak_rss_gib": kib / 2**20}))


# ----------------------------------------------------------------------------- driver


def copy_bandwidth(nbytes: int = 512 << 20, fresh: bool = False) -> float:
    """GB/s of a memory copy with torch's thread count (bytes read plus written), best of 5 after a warm-up;
    ``fresh``: into newly mapped memory each time (a ``clone``: the kernel supplies zeroed pages on first
    write, as for the tensors an in-memory merge returns; mapped explicitly, so no allocator can hand back
    pages it kept)."""
    source, target = torch.ones(nbytes, dtype=torch.uint8), torch.empty(nbytes, dtype=torch.uint8)
    target.copy_(source)
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        if fresh:
            target = torch.frombuffer(mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS), dtype=torch.uint8)
        target.copy_(source)
        best = min(best, time.perf_counter() - start)
    return 2 * nbytes / best / 1e9


def reference_errors(method: str, base: Path, paths: list[Path], out: Path) -> tuple[int, int] | None:
    """Entries of layer 0 where ``out`` differs from a float64 merge of the same inputs rounded
    once to the output dtype, and the number of entries compared (``None`` for a whole-model trim)."""
    from safetensors import safe_open

    from clpeft.merging.registry import get_method

    name, params = METHODS[method][0]
    if params.get("trim_scope") == "model":  # the float64 reference below merges one tensor at a time
        return None
    spec = get_method(name)
    params = spec.validate(params)
    outputs = {}
    for file in sorted(out.glob("*.safetensors")):
        with safe_open(file, "pt") as f:
            outputs |= {n: f.get_tensor(n) for n in f.keys() if n.startswith("model.layers.0.")}
    files = [safe_open(p / "model.safetensors", "pt") for p in [base, *paths]]
    wrong = total = 0
    for tensor_name, merged in outputs.items():
        b = files[0].get_tensor(tensor_name)
        flat = b.double().reshape(-1)
        task_vectors = torch.stack([f.get_tensor(tensor_name).double().reshape(-1) - flat for f in files[1:]])
        kwargs = {k: v for k, v in params.items() if k != "trim_scope"}
        expected = (flat + spec.fn(task_vectors, **kwargs)).to(b.dtype)
        wrong += int(torch.count_nonzero(merged.reshape(-1).to(b.dtype) != expected))
        total += expected.numel()
    return wrong, total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="full")
    parser.add_argument("--models", type=int, default=4, help="K, the number of fine-tunes")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved runs per case; the table shows the best")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated subset of {', '.join(METHODS)}")
    parser.add_argument("--dtypes", default="float32,bfloat16", help=f"comma-separated subset of {', '.join(DTYPES)}")
    parser.add_argument("--tools", default="mergekit,clpeft,clpeft-memory", help=f"comma-separated subset of {', '.join(TOOLS)}")
    parser.add_argument("--mergekit-python", default=sys.executable, help="interpreter that can import mergekit")
    parser.add_argument("--other-clpeft", type=Path, help="checkout whose clpeft the clpeft-other tool runs")
    parser.add_argument(
        "--dir", type=Path, help="where to write the checkpoints and keep them for later runs (default: a temporary directory)"
    )
    args = parser.parse_args()

    tools = args.tools.split(",")
    if "mergekit" in tools and subprocess.run([args.mergekit_python, "-c", "import mergekit"]).returncode:
        print("mergekit is not importable: its cases are skipped (pip install -e .[bench], or --mergekit-python)")
        tools.remove("mergekit")
    if any(tool.startswith("clpeft-other") for tool in tools) and args.other_clpeft is None:
        parser.error("the clpeft-other tools need --other-clpeft DIR")
    if args.dir is not None:
        args.dir.mkdir(parents=True, exist_ok=True)
    directory = Path(tempfile.mkdtemp(prefix="merge_vs_mergekit_", dir=args.dir))  # the merged outputs; removed at the end
    try:
        t = time.perf_counter()
        dtypes = args.dtypes.split(",")
        models = write_models(args.dir or directory, args.size, args.models, dtypes)
        numel = sum(torch.Size(s).numel() for s in llama_shapes(**SIZES[args.size]).values())
        print(
            f"wrote (or kept) base + {args.models} fine-tunes of {numel / 1e6:.1f}M parameters in {', '.join(dtypes)} "
            f"in {time.perf_counter() - t:.0f} s"
        )
        bandwidth = [copy_bandwidth()]
        clone_bandwidth = [copy_bandwidth(fresh=True)]
        cases = [
            (tool, method, dtype)
            for method in args.methods.split(",")
            for dtype in dtypes
            for tool in tools
            if tool != "mergekit" or METHODS[method][1] is not None
        ]
        runs: dict[tuple, list[dict]] = {case: [] for case in cases}
        for repeat in range(args.repeats):
            for case in cases:
                tool, method, dtype = case
                base, paths = models[dtype]
                out = directory / "out" / f"{tool}_{method}_{dtype}_{repeat}"
                out.parent.mkdir(exist_ok=True)
                python = args.mergekit_python if tool == "mergekit" else sys.executable
                command = [python, __file__, "--worker", tool, method, dtype, str(out), str(base), *map(str, paths)]
                root = args.other_clpeft if tool.startswith("clpeft-other") else Path(__file__).resolve().parents[1]
                env = {**os.environ, "PYTHONPATH": str(root), "HF_HUB_OFFLINE": "1"}
                if tool.endswith("-aten"):
                    env["CLPEFT_CPU_KERNEL"] = "0"
                os.sync()  # no case runs during the previous case's writeback
                load = os.getloadavg()[0]
                done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
                if done.returncode:
                    sys.exit(f"{case} failed:\n{done.stderr[-3000:]}")
                runs[case].append({**json.loads(done.stdout.strip().splitlines()[-1]), "load": load, "out": out})
                print(*case, {k: round(v, 2) for k, v in runs[case][-1].items() if k != "out"}, flush=True)
                if repeat < args.repeats - 1:
                    shutil.rmtree(out)
        bandwidth.append(copy_bandwidth())
        clone_bandwidth.append(copy_bandwidth(fresh=True))
        print_table(runs, models, args, numel, bandwidth, clone_bandwidth)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def print_table(
    runs: dict, models: dict, args: argparse.Namespace, numel: int, bandwidth: list[float], clone_bandwidth: list[float]
) -> None:
    print(f"\nmachine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, {time.strftime('%Y-%m-%d %H:%M %Z')}")
    print(
        f"copy bandwidth ({torch.get_num_threads()} thread(s), read + written): {bandwidth[0]:.1f} GB/s before, "
        f"{bandwidth[1]:.1f} GB/s after; into fresh tensors (clone): {clone_bandwidth[0]:.1f} / {clone_bandwidth[1]:.1f} GB/s"
    )
    other = f" --other-clpeft {args.other_clpeft}" if args.other_clpeft else ""
    print(
        f"command: python benchmarks/merge_vs_mergekit.py --size {args.size} --models {args.models} "
        f"--repeats {args.repeats} --methods {args.methods} --dtypes {args.dtypes} --tools {args.tools}{other}"
    )
    print(
        f"best of {args.repeats} interleaved runs; load = median 1-minute load average before the runs; "
        f"GB/s = the (K + 2) x {numel / 1e6:.1f}M entries read and written per wall second\n"
    )
    columns = [
        "method",
        "dtype",
        "tool",
        "wall s",
        "CPU s",
        "GB/s",
        "peak RSS GiB",
        "load",
        "vs mergekit (clpeft, clpeft-memory-out: vs their clpeft-other twin when run): wall / CPU speed-up, RSS ratio",
        "layer-0 entries off float64 ref",
    ]
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for (tool, method, dtype), rs in runs.items():
        wall, cpu = min(r["wall_s"] for r in rs), min(r["cpu_s"] for r in rs)
        rss = max(r["peak_rss_gib"] for r in rs)
        traffic = (args.models + 2) * numel * DTYPES[dtype].itemsize
        compared = OTHER[tool] if (OTHER.get(tool), method, dtype) in runs else "mergekit"
        other = runs.get((compared, method, dtype))
        versus = "-"
        if other and tool != "mergekit" and not tool.startswith("clpeft-other"):
            versus = (
                f"{min(r['wall_s'] for r in other) / wall:.2f}x / {min(r['cpu_s'] for r in other) / cpu:.2f}x / "
                f"{rss / max(r['peak_rss_gib'] for r in other):.2f}x"
            )
        base, paths = models[dtype]
        errors = reference_errors(method, base, paths, rs[-1]["out"])
        row = [
            method,
            dtype,
            tool,
            f"{wall:.2f}",
            f"{cpu:.2f}",
            f"{traffic / 1e9 / wall:.2f}",
            f"{rss:.2f}",
            f"{statistics.median(r['load'] for r in rs):.1f}",
            versus,
            "-" if errors is None else f"{errors[0]:,} of {errors[1]:,}",
        ]
        print("| " + " | ".join(row) + " |")
    for tool in TOOLS[1:]:
        for method in sorted({m for _, m, _ in runs}):
            full = runs.get((tool, method, "float32"))
            for half in HALF:
                cases = runs.get((tool, method, half))
                if full and cases:
                    ratio = {
                        key: min(r[key] for r in full) / min(r[key] for r in cases) / 2 for key in ("wall_s", "cpu_s")
                    }  # half the bytes
                    print(f"{tool} {method}: {half} / float32 speed per byte {ratio['wall_s']:.2f}x wall, {ratio['cpu_s']:.2f}x CPU")
    for tool in (t for t in TOOLS if "memory" in t):
        for dtype in DTYPES:
            memory = runs.get((tool, "task_arithmetic", dtype))
            if memory:
                gbs = (args.models + 2) * numel * DTYPES[dtype].itemsize / min(r["wall_s"] for r in memory) / 1e9
                print(
                    f"{tool} task arithmetic, {dtype}: {gbs:.2f} GB/s = {gbs / max(bandwidth):.0%} of the copy bandwidth, "
                    f"{gbs / max(clone_bandwidth):.0%} of the clone bandwidth"
                    + (" (into existing tensors, merge(out=...))" if tool.endswith("memory-out") else " (fresh outputs)")
                )


if __name__ == "__main__":
    if sys.argv[1:2] == ["--worker"]:
        worker(sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5], sys.argv[6], sys.argv[7:])
    else:
        main()
