"""Mixed-batch LoRA: :class:`MultiLoRALinear` against looping over adapters; merged LoRA against the base.

Part 1 -- one layer, a batch whose samples use different adapters (``--adapters`` N of them,
assigned round-robin and shuffled, so every adapter has samples). Variants, all on the same
input and the same factors, outputs checked equal before timing:

* ``base``  -- the frozen ``nn.Linear`` alone: the floor that every variant pays;
* ``multi`` -- ``MultiLoRALinear.forward(x, adapter_ids)``: gather each sample's factors, two
  batched matmuls, accumulated into the base output (with few tokens per sample: all adapters'
  factors at once, other adapters masked out);
* ``loop``  -- per adapter: find its samples, ``index_select`` them, two matmuls; then one
  ``index_add`` of all results into the base output (a tight version of what per-task adapter
  code does: no per-adapter scatter, nothing in place, so backward is cheap too);
* ``peft``  -- peft's LoRA layer holding N adapters, called with ``adapter_names=[...]`` (its
  mixed-batch path: the same loop, with Python index lists); ``--no-peft`` skips it.

Modes: ``inference`` (forward under ``no_grad``) and ``training`` (forward, then backward into
the LoRA factors). "LoRA cost" is a variant's median time minus ``base``'s (from medians only:
minima of a difference are meaningless).

Part 2 -- :class:`LoRALinear` after ``merge()`` against the plain base layer (and unmerged),
inference.

Timing: every round runs each (N, variant) once, in an order rotated between rounds so the
noise of a shared machine hits all of them alike; tables give the median (and the minimum) over
``--repeats`` rounds. On CUDA each call is bracketed by ``torch.cuda.synchronize()``.

    python benchmarks/multilora_bench.py                      # CPU, 2 threads, ViT-S sized layer
    python benchmarks/multilora_bench.py --device cuda --repeats 50
    python benchmarks/multilora_bench.py --tokens 1           # one token per sample
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import time
from collections.abc import Callable
from functools import partial

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from clpeft.components.lora import LoRALinear  # noqa: E402
from clpeft.components.lora.batched import MultiLoRALinear  # noqa: E402


class _OneLinear(nn.Module):
    def __init__(self, fc: nn.Linear):
        super().__init__()
        self.fc = fc

    def forward(self, x):
        return self.fc(x)


def loop_forward(multi: MultiLoRALinear, x: torch.Tensor, adapter_ids: torch.Tensor) -> torch.Tensor:
    """The per-adapter loop: select each adapter's samples, apply it; add all results back at once."""
    indices, deltas = [], []
    for k in range(multi.n_adapters):
        index = (adapter_ids == k).nonzero().squeeze(1)
        indices.append(index)
        deltas.append(F.linear(F.linear(x.index_select(0, index), multi.lora_A[k]), multi.lora_B[k]) * multi.scaling[k])
    return multi.base_layer(x).index_add(0, torch.cat(indices), torch.cat(deltas))


def peft_layer(multi: MultiLoRALinear) -> nn.Module:
    """peft's ``lora.Linear`` holding the same N adapters as ``multi`` (named ``a0``, ``a1``, ...)."""
    import peft

    rank = multi.lora_A.shape[1]
    config = peft.LoraConfig(r=rank, lora_alpha=rank * multi.scaling[0].item(), target_modules=["fc"])
    model = peft.get_peft_model(_OneLinear(copy.deepcopy(multi.base_layer)), config, adapter_name="a0")
    for k in range(1, multi.n_adapters):
        model.add_adapter(f"a{k}", config)
    fc = model.base_model.model.fc
    with torch.no_grad():
        for k in range(multi.n_adapters):
            fc.lora_A[f"a{k}"].weight.copy_(multi.lora_A[k])
            fc.lora_B[f"a{k}"].weight.copy_(multi.lora_B[k])
    for name, param in fc.named_parameters():  # peft trains only its active adapter by default
        param.requires_grad_(name.startswith("lora_"))
    return fc


Case = tuple[Callable[[], torch.Tensor], torch.Tensor | None]  # a forward call, its output's gradient


def make_case(n_adapters: int, args, device: torch.device) -> dict[str, Case]:
    """The variants of part 1 for N adapters; outputs are checked equal.

    Training backpropagates a dense random gradient (as a real loss gives; ``out.sum()`` would
    give a stride-0 gradient, which sends CPU ``bmm`` backward down a slow per-sample path).
    """
    gen = torch.Generator().manual_seed(n_adapters)
    base = nn.Linear(args.dim, args.dim)
    multi = MultiLoRALinear(base, n_adapters, args.rank, alpha=2.0 * args.rank).to(device)
    with torch.no_grad():
        multi.lora_B.copy_(torch.randn(multi.lora_B.shape, generator=gen) * 0.05)
    x = torch.randn(args.batch, args.tokens, args.dim, generator=gen).to(device)
    ids = (torch.arange(args.batch) % n_adapters)[torch.randperm(args.batch, generator=gen)].to(device)
    variants = {
        "base": lambda: multi.base_layer(x),
        "multi": lambda: multi(x, ids),
        "loop": lambda: loop_forward(multi, x, ids),
    }
    if args.peft:
        fc, names = peft_layer(multi), [f"a{k}" for k in ids.tolist()]
        variants["peft"] = lambda: fc(x, adapter_names=names)
    with torch.no_grad():
        reference = variants["loop"]()
        for name in ("multi", "peft"):
            if name in variants:
                torch.testing.assert_close(variants[name](), reference, rtol=1e-4, atol=1e-4)
    grad = torch.randn(reference.shape, generator=gen).to(device)
    return {name: (call, grad) for name, call in variants.items()}


def timed(case: Case, mode: str, device: torch.device) -> float:
    """Seconds for one call (inference: forward under no_grad; training: forward + backward)."""
    call, grad = case
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    if mode == "inference":
        with torch.no_grad():
            call()
    else:
        out = call()
        if out.requires_grad:
            out.backward(grad)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def run_interleaved(cases: dict[tuple, Case], mode: str, repeats: int, device: torch.device) -> dict[tuple, list[float]]:
    """Time every case ``repeats`` times, rotating the order each round."""
    keys = list(cases)
    for key in keys:  # warm-up
        timed(cases[key], mode, device)
    times: dict[tuple, list[float]] = {key: [] for key in keys}
    for r in range(repeats):
        shift = r % len(keys)
        for key in keys[shift:] + keys[:shift]:
            times[key].append(timed(cases[key], mode, device))
    return times


def ms(values: list[float]) -> str:
    return f"{statistics.median(values) * 1e3:.2f} ({min(values) * 1e3:.2f})"


def part1(args, device) -> None:
    cases = {}
    for n in args.adapters:
        for name, call in make_case(n, args, device).items():
            cases[n, name] = call
    names = [name for name in ("base", "multi", "loop", "peft") if (args.adapters[0], name) in cases]
    for mode in args.modes:
        times = run_interleaved(cases, mode, args.repeats, device)
        print(f"\n### Mixed batch, {mode}: ms per call, median (min)\n")
        others = [name for name in ("loop", "peft") if name in names]
        header = ["N"] + names
        for other in others:
            header += [f"{other} / multi: layer, medians (minima)", f"{other} / multi: LoRA cost, medians"]
        print("| " + " | ".join(header) + " |\n|" + "---|" * len(header))
        for n in args.adapters:
            row = [str(n)] + [ms(times[n, name]) for name in names]
            med = {name: statistics.median(times[n, name]) for name in names}
            low = {name: min(times[n, name]) for name in names}
            for other in others:
                lora = (med[other] - med["base"]) / max(med["multi"] - med["base"], 1e-9)
                row += [f"{med[other] / med['multi']:.2f}x ({low[other] / low['multi']:.2f}x)", f"{lora:.2f}x"]
            print("| " + " | ".join(row) + " |")


def part2(args, device) -> None:
    torch.manual_seed(0)
    plain = nn.Linear(args.dim, args.dim).to(device).requires_grad_(False)
    unmerged = LoRALinear(copy.deepcopy(plain), args.rank, alpha=2.0 * args.rank).to(device)
    with torch.no_grad():
        unmerged.lora_B.normal_(std=0.05)
    merged = copy.deepcopy(unmerged)
    merged.merge()
    x = torch.randn(args.batch, args.tokens, args.dim, device=device)
    with torch.no_grad():
        torch.testing.assert_close(merged(x), unmerged(x), rtol=1e-4, atol=1e-4)
    layers = {"base": plain, "merged": merged, "unmerged": unmerged}
    times = run_interleaved({(name,): (partial(layer, x), None) for name, layer in layers.items()}, "inference", args.repeats, device)
    base = times["base",]
    print("\n### LoRALinear inference: ms per call, median (min)\n")
    print("| variant | time | / base, medians (minima) |\n|---|---|---|")
    for (name,), values in times.items():
        ratio = f"{statistics.median(values) / statistics.median(base):.2f}x ({min(values) / min(base):.2f}x)"
        print(f"| {name} | {ms(values)} | {ratio} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=2, help="CPU threads (torch.set_num_threads)")
    parser.add_argument("--adapters", type=int, nargs="+", default=[1, 5, 10, 20], help="N values")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--tokens", type=int, default=197, help="tokens per sample (ViT-S/16 at 224 px: 197)")
    parser.add_argument("--dim", type=int, default=384, help="in = out features (ViT-S: 384)")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--modes", nargs="+", default=["inference", "training"], choices=["inference", "training"])
    parser.add_argument("--no-peft", dest="peft", action="store_false", help="skip the peft variant")
    parser.add_argument("--skip-merged", action="store_true", help="skip part 2")
    args = parser.parse_args()

    device = torch.device(args.device)
    torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, {platform.machine()}, {torch.get_num_threads()} threads, device {device}"
        + (f" ({torch.cuda.get_device_name()})" if device.type == "cuda" else "")
    )
    print(f"batch {args.batch}, tokens {args.tokens}, dim {args.dim}, rank {args.rank}, repeats {args.repeats}")
    part1(args, device)
    if not args.skip_merged:
        part2(args, device)


if __name__ == "__main__":
    main()
