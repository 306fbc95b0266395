"""SimpleCIL, RanPAC and FSA-LDA end to end with and without the feature cache (issue 7).

Each method runs the same Fashion-MNIST stream (5 experiences, frozen ImageNet EfficientNet-Lite0
at 112 px by default) twice: with ``train.feature_cache: memory`` (each image goes through the backbone once)
and with ``off``. These methods train for no epoch (FSA: epochs only in the first experience), so
"recomputing features every epoch" means recomputing them on every pass a PILOT-style learner
makes: the statistics pass after each experience and the evaluation of every test set after every
experience (T x T test passes). Both runs must give the same accuracy matrix up to float noise.

FSA with adaptation never uses the cache today: its backbone is trainable when the engine decides
whether to build one (see strategies/simplecil.py), so its two runs cost the same; the
``fsa_lda (adapt none)`` row (``--methods``) shows what the cache gives the LDA part.

    python benchmarks/prototype_cache_bench.py --train-per-class 20 --test-per-class 20
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np
import torch

METHODS = {
    "simplecil": {"name": "simplecil"},
    "ranpac (M=2000)": {"name": "ranpac", "projection_dim": 2000},
    "fsa_lda (last 2 blocks)": {"name": "fsa_lda", "adapt": "last_blocks", "adapt_blocks": 2},
    "fsa_lda (adapt none)": {"name": "fsa_lda", "adapt": "none"},
}


def run(strategy: dict, cache: str, args, root: str) -> tuple[float, list]:
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
        "backbone": {"name": "timm", "model": "tf_efficientnet_lite0", "weights": "efficientnet-lite0", "img_size": args.img_size},
        "strategy": strategy,
        "train": {"epochs": 1, "batch_size": 16, "lr": 1e-4, "optimizer": "adam", "feature_cache": cache},
        "eval": {"baseline": False},
        "logging": {"tensorboard": False, "progress": "never"},
    }
    out = tempfile.mkdtemp(dir=root)
    start = time.perf_counter()
    result = Engine(config.resolve(cfg), out, device="cpu").run()
    return time.perf_counter() - start, result["acc_matrix"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-per-class", type=int, default=20)
    parser.add_argument("--test-per-class", type=int, default=20)
    parser.add_argument("--img-size", type=int, default=112)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--methods", nargs="*", default=list(METHODS)[:3], choices=list(METHODS))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    rows = []
    with tempfile.TemporaryDirectory() as root:
        os.environ["CLPEFT_CACHE"] = root
        run(METHODS["simplecil"], "memory", args, root)  # warm-up: weights conversion, data staging, imports
        for name in args.methods:
            with_cache, r_cache = run(METHODS[name], "memory", args, root)
            without, r_off = run(METHODS[name], "off", args, root)
            rows.append((name, with_cache, without, float(np.abs(np.array(r_cache) - np.array(r_off)).max())))
            print(f"{name}: {with_cache:.1f} s with the cache, {without:.1f} s without", flush=True)
    print(
        f"load average: {os.getloadavg()[0]:.1f}; {args.train_per_class} train / {args.test_per_class} test "
        f"images per class, {args.img_size} px, {args.threads} threads"
    )
    print("| method | cache: memory, s | cache: off, s | ratio | max abs acc diff |\n|---|---|---|---|---|")
    for name, with_cache, without, diff in rows:
        print(f"| {name} | {with_cache:.1f} | {without:.1f} | {without / with_cache:.2f}x | {diff:.4f} |")


if __name__ == "__main__":
    main()
