"""The classic methods' offline table (issue 22): every replay and regularisation method on one stream, over seeds.

Two offline streams of scikit-learn digits, a trainable MLP (one hidden layer of 128), each method with its
shipped config's settings (``configs/baselines/digits_<method>.yaml``; methods without one take
``digits_replay.yaml``'s training settings, ``der`` is ``derpp`` with ``beta: 0``):

1. class-incremental, 5 experiences of 2 classes: finetune, joint, lwf, ewc, agem, replay, er_ace, der,
   derpp, x_der, gdumb, icarl, lucir, wa, bic;
2. domain-incremental, the same 10 classes rotated by 0, 45, 90, 135, 180 degrees: finetune, ewc, si, mas,
   agem, replay (``configs/baselines/digits_rotated_*.yaml``, ``configs/domain/digits_rotated_*.yaml``).

Per method: acc_last, acc_avg_incremental and forgetting, mean and standard deviation over ``--seeds``, the
replay memory and epochs it ran with, and the wall time of one run.

    OMP_NUM_THREADS=1 python benchmarks/classic_table.py --out /tmp/classic --seeds 0,1,2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch
import yaml

from clpeft import config
from clpeft.engine import Engine

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
CLASS_INCREMENTAL = [
    "finetune",
    "joint",
    "lwf",
    "ewc",
    "agem",
    "replay",
    "er_ace",
    "der",
    "derpp",
    "x_der",
    "gdumb",
    "icarl",
    "lucir",
    "wa",
    "bic",
]
DOMAIN_INCREMENTAL = ["finetune", "ewc", "si", "mas", "agem", "replay"]


def method_config(method: str, stream: str) -> dict:
    """The method's shipped digits config on ``stream`` (``class`` or ``domain``), or the replay config's settings."""
    rotated = "rotated_" if stream == "domain" else ""
    own = [CONFIGS / "baselines" / f"digits_{rotated}{method}.yaml", CONFIGS / "domain" / f"digits_{rotated}{method}.yaml"]
    if method == "der":
        cfg = yaml.safe_load((CONFIGS / "baselines" / "digits_derpp.yaml").read_text())
        cfg["strategy"]["beta"] = 0.0
        return cfg
    for path in own:
        if path.is_file():
            return yaml.safe_load(path.read_text())
    base = "domain/digits_rotated_replay.yaml" if stream == "domain" else "baselines/digits_replay.yaml"
    cfg = yaml.safe_load((CONFIGS / base).read_text())
    cfg["strategy"] = {"name": method}
    return cfg


def run(method: str, stream: str, seed: int, out: Path) -> dict:
    cfg = method_config(method, stream)
    cfg["seed"] = seed
    cfg["logging"] = {"tensorboard": False, "progress": "never"}
    t0 = time.perf_counter()
    result = Engine(config.resolve(cfg), out / stream / f"{method}_seed{seed}", device="cpu").run()
    return {
        **{k: result["metrics"][k] for k in ("acc_last", "acc_avg_incremental", "forgetting")},
        "wall_s": time.perf_counter() - t0,
        "cfg": cfg,
    }


def summarise(method: str, runs: list[dict]) -> dict:
    row = {"method": method, "wall_s": statistics.mean(r["wall_s"] for r in runs)}
    for key in ("acc_last", "acc_avg_incremental", "forgetting"):
        values = [r[key] for r in runs]
        row[key] = (statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0)
    strategy, train = runs[0]["cfg"]["strategy"], runs[0]["cfg"]["train"]
    row["memory"] = strategy.get("mem_size", "-") if method not in ("finetune", "joint", "lwf", "ewc", "si", "mas") else "-"
    row["epochs"] = train["epochs"]
    return row


def markdown(rows: list[dict]) -> str:
    lines = ["| method | acc_last | acc_avg_incremental | forgetting | memory | epochs | wall s / run |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        cells = " | ".join(f"{m:.3f} ± {s:.3f}" for m, s in (r["acc_last"], r["acc_avg_incremental"], r["forgetting"]))
        lines.append(f"| {r['method']} | {cells} | {r['memory']} | {r['epochs']} | {r['wall_s']:.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the run directories and tables.md")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    parser.add_argument("--streams", default="class,domain", help="class, domain or both")
    parser.add_argument("--methods", default=None, help="comma-separated subset of each stream's methods (default: all)")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    seeds = [int(s) for s in args.seeds.split(",")]
    tables = {}
    for stream in args.streams.split(","):
        rows = []
        methods = CLASS_INCREMENTAL if stream == "class" else DOMAIN_INCREMENTAL
        for method in [m for m in methods if args.methods is None or m in args.methods.split(",")]:
            rows.append(summarise(method, [run(method, stream, seed, args.out) for seed in seeds]))
            r = rows[-1]
            print(
                f"[{stream}] {method:9s} acc_last {r['acc_last'][0]:.3f} ± {r['acc_last'][1]:.3f}  forgetting {r['forgetting'][0]:.3f}",
                flush=True,
            )
        tables[stream] = markdown(rows)
        (args.out / f"{stream}.json").write_text(json.dumps(rows, indent=1))
    text = "\n\n".join(f"{stream}-incremental\n\n{table}" for stream, table in tables.items())
    (args.out / "tables.md").write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
