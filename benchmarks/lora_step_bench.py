"""LoRA training step vs frozen-backbone step on a ViT-S; merged LoRA inference vs the base model.

Issue 5 asks for two numbers, measured side by side in one run:

* **training**: one optimizer step of LoRA fine-tuning (``inject_lora`` on ``--targets``, rank
  ``--rank``; forward with autograd, backward through the whole ViT into the factors, Adam step on
  factors + head) against one step of a frozen backbone with a trainable head (forward under
  ``no_grad``, then forward/backward/Adam step of the head alone -- what a frozen-feature method
  pays per step when it does not cache features). Reported: the ratio of medians.
* **inference**: a forward pass (``no_grad``) of the plain model, of the LoRA model unmerged, and
  of the LoRA model after ``merge()`` on every layer. Merged LoRA should cost the same as the base.

Model: timm ``vit_small_patch14_dinov2`` at ``--img-size`` 98 (50 tokens), random weights (timing
does not depend on them), batch ``--batch`` 32, a 10-class linear head. Timing: ``--warmup``
calls of every variant, then ``--repeats`` rounds; each round runs every variant once, in an
order rotated between rounds so that the noise of a shared machine hits all of them alike.
Tables give the median (and minimum) per variant; ratios are of medians (and of minima).

    python benchmarks/lora_step_bench.py                 # CPU, 2 threads
    python benchmarks/lora_step_bench.py --device cuda --repeats 50
"""

from __future__ import annotations

import argparse
import copy
import datetime
import os
import platform
import statistics
import time
from collections.abc import Callable

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import timm  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from clpeft.components.lora import inject_lora, lora_layers  # noqa: E402


def _frozen_step(model: nn.Module, head: nn.Linear, opt: torch.optim.Optimizer, x, y) -> None:
    with torch.no_grad():
        features = model(x)
    loss = F.cross_entropy(head(features), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def _lora_step(model: nn.Module, head: nn.Linear, opt: torch.optim.Optimizer, x, y) -> None:
    loss = F.cross_entropy(head(model(x)), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def _forward(model: nn.Module, x) -> None:
    with torch.no_grad():
        model(x)


def _time(fn: Callable[[], None], device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1000


def _rounds(variants: dict[str, Callable[[], None]], warmup: int, repeats: int, device) -> dict[str, list[float]]:
    for fn in variants.values():
        for _ in range(warmup):
            fn()
    names = list(variants)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            times[name].append(_time(variants[name], device))
    return times


def _table(times: dict[str, list[float]], reference: str) -> str:
    ref_med, ref_min = statistics.median(times[reference]), min(times[reference])
    lines = [f"| variant | ms per call, median (min) | / {reference}, medians (minima) |", "|---|---|---|"]
    for name, ts in times.items():
        med, low = statistics.median(ts), min(ts)
        lines.append(f"| {name} | {med:.1f} ({low:.1f}) | {med / ref_med:.2f}x ({low / ref_min:.2f}x) |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--img-size", type=int, default=98)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--targets", nargs="+", default=["qkv", "proj", "fc1", "fc2"])
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    torch.manual_seed(0)

    base = timm.create_model("vit_small_patch14_dinov2", img_size=args.img_size, num_classes=0).to(device).eval()
    base.requires_grad_(False)
    lora = copy.deepcopy(base)
    inject_lora(lora, args.targets, rank=args.rank, alpha=2.0 * args.rank)
    for layer in lora_layers(lora).values():  # a trained-looking update, so nothing is trivially zero
        with torch.no_grad():
            layer.lora_B.normal_(std=0.01)
    merged = copy.deepcopy(lora)
    for layer in lora_layers(merged).values():
        layer.merge()
    heads = {k: nn.Linear(base.num_features, 10).to(device) for k in ("frozen", "lora")}
    opts = {
        "frozen": torch.optim.Adam(heads["frozen"].parameters(), lr=1e-3),
        "lora": torch.optim.Adam([p for p in lora.parameters() if p.requires_grad] + list(heads["lora"].parameters()), lr=1e-3),
    }
    x = torch.randn(args.batch, 3, args.img_size, args.img_size, device=device)
    y = torch.randint(0, 10, (args.batch,), device=device)
    with torch.no_grad():
        check = (merged(x) - lora(x)).abs().max().item()

    started = time.perf_counter()
    lora.train()
    train = _rounds(
        {
            "frozen backbone + head step": lambda: _frozen_step(base, heads["frozen"], opts["frozen"], x, y),
            "LoRA step": lambda: _lora_step(lora, heads["lora"], opts["lora"], x, y),
        },
        args.warmup,
        args.repeats,
        device,
    )
    lora.eval()
    infer = _rounds(
        {
            "base forward": lambda: _forward(base, x),
            "LoRA unmerged forward": lambda: _forward(lora, x),
            "LoRA merged forward": lambda: _forward(merged, x),
        },
        args.warmup,
        args.repeats,
        device,
    )
    seconds = time.perf_counter() - started

    n_lora = sum(p.numel() for p in lora.parameters() if p.requires_grad)
    print(
        f"- Date: {datetime.date.today().isoformat()}; machine: {platform.machine()}, {os.cpu_count()} CPUs "
        f"({platform.processor() or platform.platform()}), device {device}, {args.threads} threads, "
        f"load average {os.getloadavg()[0]:.1f} at the end; torch {torch.__version__}, timm {timm.__version__}."
    )
    print(
        f"- Model: vit_small_patch14_dinov2 at {args.img_size} px ({(args.img_size // 14) ** 2 + 1} tokens), batch "
        f"{args.batch}; LoRA rank {args.rank} on {', '.join(args.targets)} ({len(lora_layers(lora))} layers, "
        f"{n_lora:,} trainable factors); merged vs unmerged outputs differ by {check:.1e} at most."
    )
    print(f"- {args.warmup} warm-up calls per variant, {args.repeats} interleaved rounds; timed part took {seconds:.0f} s.\n")
    print("### Training step\n")
    print(_table(train, "frozen backbone + head step"))
    print("\n### Inference (forward, no_grad)\n")
    print(_table(infer, "base forward"))


if __name__ == "__main__":
    main()
