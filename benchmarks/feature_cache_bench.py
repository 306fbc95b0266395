"""Frozen-backbone training with and without the feature cache, end to end (issue 5).

The same run -- Fashion-MNIST class-incremental, frozen ImageNet EfficientNet-Lite0 at 112 px,
`finetune` on the cached features, N epochs -- once with `train.feature_cache: memory` (features
computed once per sample) and once with `off` (the backbone runs on every batch of every epoch and
every evaluation, as code without a cache does). Both must give the same accuracy matrix up to
float noise; the script prints the wall-time ratio.

    python benchmarks/feature_cache_bench.py --epochs 10 --train-per-class 50 --test-per-class 20
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np
import torch


def run(cache: str, args, root: str) -> tuple[float, list]:
    from clpeft import config
    from clpeft.engine import Engine

    cfg = {
        "seed": 0,
        "scenario": {
            "name": "class_incremental",
            "dataset": "fashion_mnist",
            "n_experiences": 5,
            "train_per_class": args.train_per_class,
            "test_per_class": args.test_per_class,
            "root": os.path.join(root, "data"),
        },
        "backbone": {"name": "timm", "model": "tf_efficientnet_lite0", "weights": "efficientnet-lite0", "img_size": 112},
        "strategy": {"name": "finetune"},
        "train": {"epochs": args.epochs, "batch_size": 32, "lr": 0.01, "feature_cache": cache},
        "eval": {"baseline": False},
        "logging": {"tensorboard": False, "progress": "never"},
    }
    start = time.perf_counter()
    result = Engine(config.resolve(cfg), os.path.join(root, f"run-{cache}"), device="cpu").run()
    return time.perf_counter() - start, result["acc_matrix"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--train-per-class", type=int, default=50)
    parser.add_argument("--test-per-class", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory() as root:
        os.environ["CLPEFT_CACHE"] = root
        run("memory", args, root)  # warm-up: weights conversion, data staging, imports
        with_cache, r_cache = run("memory", args, root + "/b")
        without, r_off = run("off", args, root + "/c")
    diff = float(np.abs(np.array(r_cache) - np.array(r_off)).max())
    print(
        f"load average: {os.getloadavg()[0]:.1f}; {args.epochs} epochs, {args.train_per_class} train / "
        f"{args.test_per_class} test images per class, {args.threads} threads"
    )
    print("| feature cache | wall s |\n|---|---|")
    print(f"| memory (once per sample) | {with_cache:.1f} |\n| off (every batch) | {without:.1f} |")
    print(f"speed-up: {without / with_cache:.1f}x; max |accuracy difference| between the two matrices: {diff:.4f}")


if __name__ == "__main__":
    main()
