"""Issue 8's DDP equivalence table: every strategy on 1 process vs 2 ``torchrun`` processes (gloo, CPU).

Each row runs the same config twice, ``clpeft run`` and ``torchrun --standalone --nproc_per_node 2 -m
clpeft run``, and compares the two ``metrics.json`` accuracy matrices. The stream is sklearn digits
(2 experiences x 5 classes, 9 training images per class, so the last global batch of 8 has
a single image and rank 1's share of it is empty) on the tiny random-init ``test_vit`` backbone, or
an MLP / BatchNorm CNN for the plain baselines. The engine's per-experience digest check
(``clpeft.distributed.check_consistent``) runs in every 2-process run, so a row that completes
also shows that the ranks ended every experience with identical states.

    OMP_NUM_THREADS=1 python benchmarks/ddp_equivalence.py --out /tmp/ddp [--only l2p,slca]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import yaml

STREAM = {"name": "class_incremental", "dataset": "sklearn_digits", "n_experiences": 2, "train_per_class": 9, "test_per_class": 5}
VIT = {"name": "timm", "model": "test_vit", "img_size": 32, "freeze": True}
TRAIN = {"epochs": 2, "batch_size": 8, "lr": 0.01, "optimizer": "adam"}

# name -> (strategy section, backbone section, train overrides)
CASES = {
    "finetune (MLP)": ({"name": "finetune"}, {"name": "mlp", "hidden": [64]}, {"lr": 0.05, "optimizer": "sgd"}),
    "finetune (BN CNN)": ({"name": "finetune"}, {"name": "cnn"}, {"lr": 0.05, "optimizer": "sgd"}),
    "replay (MLP)": ({"name": "replay", "mem_size": 20}, {"name": "mlp", "hidden": [64]}, {"lr": 0.05, "optimizer": "sgd"}),
    "lwf": ({"name": "lwf"}, {**VIT, "freeze": False}, {}),
    "ewc": ({"name": "ewc"}, {**VIT, "freeze": False}, {}),
    "l2p": ({"name": "l2p"}, VIT, {}),
    "dualprompt": ({"name": "dualprompt"}, VIT, {}),
    "coda_prompt": ({"name": "coda_prompt"}, VIT, {}),
    "simplecil": ({"name": "simplecil"}, VIT, {}),
    "ranpac": ({"name": "ranpac", "projection_dim": 64}, VIT, {}),
    "fsa_lda (dropout 0.5)": ({"name": "fsa_lda"}, {**VIT, "freeze": False}, {}),
    "fsa_lda (dropout 0)": ({"name": "fsa_lda", "dropout": 0.0}, {**VIT, "freeze": False}, {}),
    "aper": ({"name": "aper"}, {**VIT, "freeze": False}, {}),
    "slca": ({"name": "slca"}, {**VIT, "freeze": False}, {}),
    "lora_cl": ({"name": "lora_cl"}, {**VIT, "freeze": False}, {}),
    "lae": ({"name": "lae"}, {**VIT, "freeze": False}, {}),
}


def _run(config: Path, out: Path, nproc: int) -> tuple[float, str]:
    launcher = (
        [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1 else [sys.executable]
    )
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"), "HF_HUB_OFFLINE": "1"}
    t0 = time.perf_counter()
    done = subprocess.run(
        [*launcher, "-m", "clpeft", "run", str(config), "--out", str(out), "--device", "cpu"], capture_output=True, text=True, env=env
    )
    error = "" if done.returncode == 0 else (done.stderr.strip().splitlines() or ["?"])[-1]
    return time.perf_counter() - t0, error


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--only", default="", help="comma-separated case names (prefix match)")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    wanted = [w for w in args.only.split(",") if w]
    rows = [
        "| strategy | backbone | acc_last 1 proc | acc_last 2 procs | max abs diff of the matrix | seconds 1 / 2 procs |",
        "|---|---|---|---|---|---|",
    ]
    for name, (strategy, backbone, train) in CASES.items():
        if wanted and not any(name.startswith(w) for w in wanted):
            continue
        slug = name.replace(" ", "_").replace("(", "").replace(")", "").replace(".", "")
        config = out / f"{slug}.yaml"
        config.write_text(
            yaml.safe_dump(
                {
                    "seed": 0,
                    "scenario": STREAM,
                    "backbone": backbone,
                    "strategy": strategy,
                    "train": {**TRAIN, **train},
                    "eval": {"batch_size": 16, "baseline": False},
                    "logging": {"tensorboard": False, "progress": "never"},
                }
            )
        )
        results, seconds = [], []
        for nproc in (1, 2):
            run_dir = out / f"{slug}-{nproc}"
            s, error = _run(config, run_dir, nproc)
            seconds.append(s)
            if error:
                results = None
                print(f"{name}: {nproc} process(es) failed: {error}", flush=True)
                break
            results.append(json.loads((run_dir / "metrics.json").read_text()))
        if results is None:
            rows.append(f"| {name} | {backbone['name']} | failed | | | |")
            continue
        a, b = (np.array(r["acc_matrix"]) for r in results)
        row = (
            f"| {name} | {backbone.get('model', backbone['name'])} | {results[0]['metrics']['acc_last']:.3f} | "
            f"{results[1]['metrics']['acc_last']:.3f} | {np.abs(a - b).max():.3f} | {seconds[0]:.0f} / {seconds[1]:.0f} |"
        )
        rows.append(row)
        print(row, flush=True)
    table = "\n".join(rows)
    (out / "ddp_equivalence.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
