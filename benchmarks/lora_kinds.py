"""Trainable parameters and training-step time of every LoRA adapter kind on a ViT-S (issue 23).

Each kind of :mod:`clpeft.components.lora.kinds` (``lora``, ``dora``, ``pissa``, ``vera``,
``lora_xs``) is injected with ``--rank`` on ``--targets`` of a timm ``vit_small_patch14_dinov2``
(random weights: timing does not depend on them; 12 blocks, width 384) at ``--img-size`` px.
Reported per kind: the trainable parameters of the adapters (the head excluded), the seconds of
one training step (forward with autograd, backward into the adapter tensors, Adam step on them and
a 10-class head), and its ratio to LoRA's; and the cost of building the adapters (PiSSA and
LoRA-XS take an SVD of every adapted weight). Timing: ``--warmup`` steps of every kind, then
``--repeats`` rounds, each running every kind once in an order rotated between rounds so the noise
of a shared machine hits all kinds alike; medians (and minima).

    OMP_NUM_THREADS=1 python benchmarks/lora_kinds.py
"""

from __future__ import annotations

import argparse
import copy
import datetime
import os
import platform
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import timm  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from clpeft.components.lora import ADAPTER_KINDS, inject_lora  # noqa: E402


def _build(base: torch.nn.Module, kind: str, args) -> tuple[torch.nn.Module, torch.nn.Linear, torch.optim.Optimizer, float, int]:
    model = copy.deepcopy(base)
    start = time.perf_counter()
    inject_lora(model, args.targets, args.rank, 2.0 * args.rank, kind=kind)
    built = time.perf_counter() - start
    trained = [p for p in model.parameters() if p.requires_grad]
    head = torch.nn.Linear(model.num_features, 10)
    opt = torch.optim.Adam([*trained, *head.parameters()], lr=1e-3)
    return model, head, opt, built, sum(p.numel() for p in trained)


def _step(model, head, opt, x, y) -> float:
    start = time.perf_counter()
    loss = F.cross_entropy(head(model(x)), y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--targets", nargs="+", default=["qkv", "proj", "fc1", "fc2"])
    parser.add_argument("--img-size", type=int, default=56)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()

    torch.manual_seed(0)
    base = timm.create_model("vit_small_patch14_dinov2", pretrained=False, img_size=args.img_size, num_classes=0).train()
    x = torch.randn(args.batch, 3, args.img_size, args.img_size)
    y = torch.randint(0, 10, (args.batch,))
    built = {kind: _build(base, kind, args) for kind in ADAPTER_KINDS}
    for kind in ADAPTER_KINDS:
        for _ in range(args.warmup):
            _step(*built[kind][:3], x, y)
    times = {kind: [] for kind in ADAPTER_KINDS}
    for r in range(args.repeats):
        order = ADAPTER_KINDS[r % len(ADAPTER_KINDS) :] + ADAPTER_KINDS[: r % len(ADAPTER_KINDS)]
        for kind in order:
            times[kind].append(_step(*built[kind][:3], x, y))

    tokens = (args.img_size // 14) ** 2 + 1
    print(
        f"{datetime.date.today()}  {platform.machine()}  torch {torch.__version__}  threads {torch.get_num_threads()}  "
        f"ViT-S/14 at {args.img_size} px ({tokens} tokens), batch {args.batch}, rank {args.rank} on {' '.join(args.targets)}, "
        f"{args.repeats} rounds"
    )
    print("| kind | trainable parameters | vs LoRA | step, median s (min) | step vs LoRA (medians) | building the adapters, s |")
    print("|---|---|---|---|---|---|")
    lora_params, lora_time = built["lora"][4], statistics.median(times["lora"])
    for kind in ADAPTER_KINDS:
        params, med = built[kind][4], statistics.median(times[kind])
        print(
            f"| {kind} | {params:,} | {params / lora_params:.3f} | {med:.3f} ({min(times[kind]):.3f}) | "
            f"{med / lora_time:.2f} | {built[kind][3]:.2f} |"
        )


if __name__ == "__main__":
    main()
