"""EASE's test-time features: every task's adapter set in one batched pass against a pass per set (PILOT's loop).

LAMDA-PILOT's ``backbone/vit_ease.py`` (``forward_test``, ``forward_proto``) runs the blocks once per
adapter set; clpeft's :func:`~clpeft.components.lora.adapter_bank.every_adapter` repeats the embedded
batch ``n`` times and runs the blocks once, each copy through its own adapters
(``tests/reference/test_pilot_breadth.py`` counts both and checks the features equal). This script
times the two on a randomly initialised timm ViT (no download) and prints, per number of adapter
sets ``n``: passes through the blocks, samples through them, and the median / minimum wall time of
``--rounds`` interleaved rounds.

    HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1 python benchmarks/ease_passes.py --model vit_small_patch16_224 --img-size 112
"""

from __future__ import annotations

import argparse
import statistics
import time

import timm
import torch

from clpeft.components.lora.adapter_bank import every_adapter, inject_adapter_banks, split_by_adapter
from clpeft.components.lora.parallel_adapter import Adapter


def _banks(vit, n: int, bottleneck: int):
    banks = inject_adapter_banks(vit, bottleneck)
    for _ in range(n):
        for bank in banks:
            for p in bank.new_adapter().parameters():
                torch.nn.init.normal_(p, std=0.02)
            bank.freeze_current()
    return banks


@torch.no_grad()
def _loop(vit, banks, x: torch.Tensor, n: int) -> torch.Tensor:
    """A plain forward per adapter set (each bank's current adapter set to set ``k``)."""
    out = []
    for k in range(n):
        for bank in banks:
            adapter = bank.current = Adapter(bank.dim, bank.bottleneck, bank.scale, dropout=0.0)
            for module, w, b in ((adapter.down_proj, bank.down_weight, bank.down_bias), (adapter.up_proj, bank.up_weight, bank.up_bias)):
                module.weight.copy_(w[k])
                module.bias.copy_(b[k])
        out.append(vit(x))
    for bank in banks:
        bank.current = None
    return torch.stack(out, 1)


@torch.no_grad()
def _batched(vit, banks, x: torch.Tensor, n: int) -> torch.Tensor:
    with every_adapter(vit, banks, n):
        return split_by_adapter(vit(x), n)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_small_patch16_224")
    parser.add_argument("--img-size", type=int, default=112)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--sets", type=int, nargs="+", default=[1, 5, 10])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    print(f"{args.model} at {args.img_size} px, batch {args.batch}, {args.device}, {torch.get_num_threads()} thread(s)")
    print("sets | loop: passes, samples, median / min s | batched: passes, samples, median / min s | speed-up (median)")
    for n in args.sets:
        torch.manual_seed(0)
        vit = timm.create_model(args.model, pretrained=False, num_classes=0, img_size=args.img_size).eval().to(args.device)
        banks = _banks(vit, n, bottleneck=64)
        x = torch.randn(args.batch, 3, args.img_size, args.img_size, device=args.device)
        counts = {}
        last = vit.blocks[-1]
        hook = last.register_forward_hook(
            lambda m, a, o: (
                counts.__setitem__("calls", counts.get("calls", 0) + 1)
                or counts.__setitem__("samples", counts.get("samples", 0) + a[0].shape[0])
            )
        )
        stats = {}
        for name, run in (("loop", _loop), ("batched", _batched)):
            counts.clear()
            stats[name] = {"features": run(vit, banks, x, n), **counts, "times": []}
        hook.remove()
        torch.testing.assert_close(stats["batched"]["features"], stats["loop"]["features"], atol=1e-4, rtol=1e-4)
        for _ in range(args.rounds):
            for name, run in (("loop", _loop), ("batched", _batched)):
                if args.device == "cuda":
                    torch.cuda.synchronize()
                t0 = time.perf_counter()
                run(vit, banks, x, n)
                if args.device == "cuda":
                    torch.cuda.synchronize()
                stats[name]["times"].append(time.perf_counter() - t0)
        cells = [
            f"{s['calls']}, {s['samples']}, {statistics.median(s['times']):.3f} / {min(s['times']):.3f}"
            for s in (stats["loop"], stats["batched"])
        ]
        speed = statistics.median(stats["loop"]["times"]) / statistics.median(stats["batched"]["times"])
        print(f"{n:4d} | {cells[0]} | {cells[1]} | {speed:.2f}x")


if __name__ == "__main__":
    main()
