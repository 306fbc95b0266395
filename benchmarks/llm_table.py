"""The offline continual instruction-tuning table (issue 25): every generative strategy on one stream.

SmolLM2-135M-Instruct (packaged, offline) learns four tasks in turn: three generated ones scored by
exact match (``date_format``, ``add``, ``sort``) and Rotten Tomatoes sentiment scored by label words
(48 training and 16 test examples each, 2 epochs of batches of 8), each strategy with the same rank-8 LoRA on
the attention's query and value projections, the same data, epochs and learning rate. After each
task the model answers every task's test prompts by greedy decoding; each task's metric fills the
accuracy matrix ``R[i][j]``. Per strategy: the matrix, ``acc_last``, BWT, forgetting, FWT (against the
untrained model's zero-shot answers), the perplexity of held-out general text before and after the
stream, and the run's wall time.

Strategies and their settings (everything else at its default):

* ``seq_finetune``: one LoRA trained on each task in turn (lower bound);
* ``joint``: one LoRA on every task seen so far (multi-task upper bound);
* ``replay``: stored examples, ``mem_size`` 48 (a quarter of the stream's 192 training examples);
* ``ewc``, ``lwf``: their defaults on the LoRA;
* ``o_lora``: a LoRA per task, orthogonal to the past ones (``lambda_1`` 0.5);
* ``lora_cl``: InfLoRA subspaces (``subspace: inflora``) on ``q_proj``/``v_proj`` at threshold 0.999, as
  ``configs/llm/offline_smollm2_lora_cl.yaml`` (at the ViT's 0.97 the squared-eigenvalue rule keeps only 1-4
  of SmolLM2's 576 directions per layer);
* ``merge_cl``: a fresh LoRA per task from the pretrained weights, task vectors merged by task
  arithmetic;
* ``task_lora``: a LoRA per task served together, prompts routed to the nearest task centroid
  (``routing: router``; ``task_lora+task_id`` gives each prompt its own task's LoRA).

One JSON per strategy lands in ``--out`` (a re-run skips the strategies already there), then the
Markdown table is printed::

    OMP_NUM_THREADS=2 python benchmarks/llm_table.py --out /tmp/llm_table
    OMP_NUM_THREADS=1 python benchmarks/llm_table.py --out /tmp/llm_table --methods o_lora,merge_cl
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from clpeft import config
from clpeft.engine import Engine

TASKS = [
    {"task": "date_format", "train": 48, "test": 16, "max_new_tokens": 12},
    {"task": "add", "train": 48, "test": 16, "max_new_tokens": 6},
    {"task": "sort", "train": 48, "test": 16, "max_new_tokens": 12},
    {"task": "rotten_tomatoes", "train": 48, "test": 16, "max_new_tokens": 4},
]
LORA = {"lora_targets": ["q_proj", "v_proj"], "lora_rank": 8, "lora_alpha": 16}
STRATEGIES: dict[str, dict] = {
    "seq_finetune": {"name": "seq_finetune", **LORA},
    "joint": {"name": "joint", **LORA},
    "replay": {"name": "replay", "mem_size": 48, **LORA},
    "ewc": {"name": "ewc", **LORA},
    "lwf": {"name": "lwf", **LORA},
    "o_lora": {"name": "o_lora", **LORA},
    "lora_cl": {
        "name": "lora_cl",
        "targets": ["q_proj", "v_proj"],
        "rank": 8,
        "alpha": 16,
        "subspace": "inflora",
        "subspace_threshold": 0.999,
    },
    "merge_cl": {"name": "merge_cl", **LORA},
    "task_lora": {"name": "task_lora", "routing": "router", "max_tasks": len(TASKS), **LORA},
    "task_lora+task_id": {"name": "task_lora", "routing": "task_id", "max_tasks": len(TASKS), **LORA},
}
METRICS = ("acc_last", "bwt", "forgetting", "fwt", "perplexity_before", "perplexity_after", "router_accuracy")


def run_config(strategy: dict, seed: int) -> dict:
    """The run's configuration: the shared stream, backbone and training with ``strategy``."""
    return {
        "seed": seed,
        "scenario": {"name": "instruction_incremental", "tasks": TASKS},
        "backbone": {"name": "generative_lm", "weights": "smollm2-135m", "chat_template": True, "max_length": 128},
        "strategy": strategy,
        "train": {"epochs": 2, "batch_size": 8, "lr": 0.003, "optimizer": "adam"},
        "eval": {"batch_size": 16},
        "logging": {"tensorboard": False, "progress": "never"},
    }


def run(method: str, seed: int, out: Path, lr: float | None = None) -> dict:
    """Run one strategy (or read its earlier result from ``out``); ``lr`` replaces the shared 0.003."""
    name = method if lr is None else f"{method} (lr {lr:g})"
    done = out / f"{name.replace(' ', '_')}.json"
    if done.is_file():
        return json.loads(done.read_text())
    t0 = time.perf_counter()
    cfg = run_config(STRATEGIES[method], seed)
    if lr is not None:
        cfg["train"]["lr"] = lr
    result = Engine(config.resolve(cfg), out / "runs" / name.replace(" ", "_"), device="cpu").run()
    metrics = result["metrics"]
    row = {
        "method": name,
        "acc_matrix": result["acc_matrix"],
        **{k: metrics[k] for k in METRICS if k in metrics},
        "wall_s": time.perf_counter() - t0,
        "threads": torch.get_num_threads(),
        "finished": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }
    done.write_text(json.dumps(row, indent=1))
    return row


def _fmt(value) -> str:
    return "" if value is None else f"{value:.3f}" if isinstance(value, float) else str(value)


def table(rows: list[dict]) -> str:
    """The summary table and each strategy's accuracy matrix, as Markdown."""
    names = [t["task"] for t in TASKS]
    lines = [
        "| strategy | acc_last | BWT | forgetting | FWT | perplexity before -> after | router accuracy | wall min |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ppl = f"{r['perplexity_before']:.2f} -> {r['perplexity_after']:.2f}" if "perplexity_after" in r else ""
        cells = [r["method"], *(_fmt(r.get(k)) for k in ("acc_last", "bwt", "forgetting", "fwt")), ppl, _fmt(r.get("router_accuracy"))]
        lines.append("| " + " | ".join(cells) + f" | {r['wall_s'] / 60:.1f} |")
    lines += ["", "Accuracy matrices (row: after task i; column: task j; each task's metric):", ""]
    for r in rows:
        lines += [f"`{r['method']}`", "", "| after \\ on | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
        lines += [f"| {names[i]} | " + " | ".join(f"{v:.3f}" for v in row) + " |" for i, row in enumerate(r["acc_matrix"])]
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for each strategy's JSON and run directory")
    parser.add_argument("--methods", default=",".join(STRATEGIES), help="comma-separated, from: " + ", ".join(STRATEGIES))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--lr", type=float, help="learning rate of every listed strategy instead of the shared 0.003")
    args = parser.parse_args(argv)
    methods = args.methods.split(",")
    unknown = sorted(set(methods) - set(STRATEGIES))
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {', '.join(STRATEGIES)}")
    args.out.mkdir(parents=True, exist_ok=True)
    print(
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, {torch.get_num_threads()} threads"
    )
    rows = []
    for method in methods:
        rows.append(run(method, args.seed, args.out, args.lr))
        print(f"{rows[-1]['method']}: acc_last {rows[-1].get('acc_last'):.3f}, {rows[-1]['wall_s'] / 60:.1f} min", flush=True)
    print(table(rows))


if __name__ == "__main__":
    main()
