"""Issue 7's offline results table: every pretrained-model strategy on one stream, side by side.

Runs ``configs/<method>/fmnist_offline.yaml`` for each method through the real engine, with the
scenario section forced to one common stream (Fashion-MNIST, 5 experiences of 2 classes, the same
per-class subsample for every method) and ``finetune`` on the same frozen backbone as the lower
bound; prints and writes a Markdown table of acc_last, acc_avg_incremental, forgetting, wall time
and trainable parameters. Runs one after another in one process, so wall times are comparable when
the machine is otherwise idle.

A method named ``<method>+align`` runs the same config with ``strategy.align: true`` (SLCA's
classifier alignment added to a prompt or LoRA method), ``<method>+sdc`` adds semantic drift
compensation of the aligned statistics as well, ``lora_cl+nosubspace`` lora_cl without InfLoRA's
interference-free updates, which its config turns on (variants combine: ``lora_cl+nosubspace+sdc``),
``+merge`` merges each finished experience's update into the weights, and ``<method>+dora`` (``pissa``,
``vera``, ``lora_xs``, ``adalora``) a LoRA method with that adapter kind; the kinds compare on
``lora_cl+nosubspace+merge+<kind>`` (a designed ``A`` and frozen old updates are not defined for all of them).

    OMP_NUM_THREADS=2 python benchmarks/ptm_table.py --out /tmp/ptm_table
    python benchmarks/ptm_table.py --methods simplecil,ranpac --train-per-class 10 --out /tmp/t  # a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch
import yaml

from clpeft import config
from clpeft.engine import Engine

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
METHODS = ["finetune", "simplecil", "ranpac", "fsa_lda", "aper", "slca", "l2p", "dualprompt", "coda_prompt", "lora_cl", "lae", "merge_cl"]
METHODS += [f"{m}+{v}" for v in ("align", "sdc") for m in ("l2p", "dualprompt", "coda_prompt", "lora_cl", "lae", "merge_cl")]
METHODS += ["lora_cl+nosubspace", "lora_cl+nosubspace+align", "lora_cl+nosubspace+sdc"]
METHODS += ["fecam", "ease", "cofima", "hide_prompt", "hide_lora", "ovor", "mos", "duct"]  # issue 22's pretrained-model methods
VARIANTS = {
    "align": {"align": True},
    "sdc": {"align": True, "drift_compensation": True},
    "nosubspace": {"subspace": "none"},
    "merge": {"old_updates": "merge"},
    "noclspos": {"prompt_position": "none"},  # L2P's prompts without [CLS]'s position embedding (before 45bda6b)
    "eva": {"init": "eva"},  # lora_cl's updates started at EVA's input components (issue 23)
}
VARIANTS.update({kind: {"adapter": kind} for kind in ("dora", "pissa", "vera", "lora_xs", "adalora")})  # LoRA kinds (issue 23)


def method_config(method: str, args) -> dict:
    """The method's offline config on the common stream (``finetune`` borrows simplecil's backbone)."""
    method, *variants = method.split("+")
    source = "simplecil" if method == "finetune" else method
    cfg = yaml.safe_load((CONFIGS / source / "fmnist_offline.yaml").read_text())
    for variant in variants:
        if variant not in VARIANTS:
            raise SystemExit(f"unknown variant '+{variant}' in --methods: use one of {', '.join(VARIANTS)}")
        cfg["strategy"].update(VARIANTS[variant])
    if method == "finetune":
        cfg["strategy"] = {"name": "finetune"}
        cfg["train"] = {"epochs": 10, "batch_size": 16, "lr": 0.01, "optimizer": "sgd"}
    cfg["seed"] = args.seed
    cfg["scenario"] = {
        "name": "class_incremental",
        "dataset": "fashion_mnist",
        "n_experiences": 5,
        "train_per_class": args.train_per_class,
        "test_per_class": args.test_per_class,
    }
    cfg["logging"] = {"tensorboard": False, "progress": "never"}
    return cfg


def run(method: str, args) -> dict:
    cfg = method_config(method, args)
    t0 = time.perf_counter()
    result = Engine(config.resolve(cfg), args.out / method, device="cpu").run()
    m = result["metrics"]
    return {
        "method": method,
        "acc_last": m["acc_last"],
        "acc_avg_incremental": m["acc_avg_incremental"],
        "forgetting": m["forgetting"],
        "wall_s": time.perf_counter() - t0,
        "trainable": result["parameters"]["trainable"],
    }


def markdown(rows: list[dict]) -> str:
    lines = ["| method | acc_last | acc_avg_incremental | forgetting | wall s | trainable parameters |", "|---|---|---|---|---|---|"]
    lines += [
        f"| {r['method']} | {r['acc_last']:.3f} | {r['acc_avg_incremental']:.3f} | {r['forgetting']:.3f} | "
        f"{r['wall_s']:.0f} | {r['trainable']:,} |"
        for r in rows
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the run directories and table.md")
    parser.add_argument("--methods", default=",".join(METHODS), help="comma-separated subset of " + ",".join(METHODS))
    parser.add_argument("--train-per-class", type=int, default=40)
    parser.add_argument("--test-per-class", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for method in args.methods.split(","):
        rows.append(run(method, args))
        r = rows[-1]
        print(f"{method:12s} acc_last {r['acc_last']:.3f}  forgetting {r['forgetting']:.3f}  wall {r['wall_s']:.0f}s", flush=True)
        (args.out / "table.json").write_text(json.dumps(rows, indent=1))
    table = markdown(rows)
    (args.out / "table.md").write_text(table + "\n")
    print(table)


if __name__ == "__main__":
    main()
