"""Backbone passes per training step of L2P, DualPrompt and CODA-Prompt: cached query vs recomputed query.

The three methods key their prompts on the frozen backbone's feature of each input (the query) and
then run the backbone again with the prompts injected. PILOT-style code (LAMDA-PILOT and the
official ports) computes the query with a second forward pass at every training and test step;
clpeft's strategies declare ``needs_query`` and take it from the feature cache. This script runs
each method through the engine twice on the same stream:

* ``clpeft``: the strategy as shipped (query from the in-memory feature cache);
* ``pilot-style``: a subclass that does not ask for the cached query, so each step computes it
  with an extra backbone pass (the comparison; everything else is identical);

and counts passes through the ViT with ``TimmBackbone.count_passes()`` (a hook on the patch
embedding). Columns:

* ``passes/step``: backbone passes made inside ``training_step``, per step (goal: <= 1.1 vs 2.0);
* ``train img/img``: images through the backbone while training an experience, per image trained
  on; for clpeft this includes the cache's one-off pass over the training data (1 + 1/epochs);
* ``run images``: images through the backbone in the whole run (training, cache, evaluation);
* ``wall s``: seconds for the whole run (one run each: noisy on a shared machine).

Both variants compute the same thing, so their accuracies agree (a check that the cached query
is the recomputed one).

Run (under two minutes on one CPU thread)::

    OMP_NUM_THREADS=1 python benchmarks/prompt_passes.py
"""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
import time

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from clpeft import config  # noqa: E402
from clpeft.engine import Engine  # noqa: E402

EPOCHS = 3
METHODS = {
    "l2p": {"name": "l2p", "pool_size": 10, "prompt_length": 5, "top_k": 5},
    "dualprompt": {"name": "dualprompt", "pool_size": 5},
    "coda_prompt": {"name": "coda_prompt", "components_per_task": 10},
}


def _config(strategy: dict, root: str) -> dict:
    return {
        "seed": 0,
        "scenario": {
            "name": "class_incremental",
            "dataset": "sklearn_digits",
            "n_experiences": 5,
            "train_per_class": 16,
            "test_per_class": 4,
            "root": root,
        },
        "backbone": {"name": "timm", "model": "vit_tiny_patch16_224", "img_size": 32, "freeze": True},
        "strategy": strategy,
        "train": {"epochs": EPOCHS, "batch_size": 16, "lr": 0.005, "optimizer": "adam", "feature_cache": "memory"},
        "eval": {"batch_size": 64, "baseline": False},
        "logging": {"tensorboard": False, "progress": "never"},
    }


def measure(strategy: dict, pilot_style: bool, root: str) -> dict:
    """One engine run; returns pass counts and the wall time."""
    cfg = config.resolve(_config(strategy, root))
    if pilot_style:
        cls = cfg.strategy.cls
        cfg.strategy.cls = type(f"PilotStyle{cls.__name__}", (cls,), {"needs_query": False})
    engine = Engine(cfg, tempfile.mkdtemp(prefix="prompt_passes_"), device="cpu")
    run = engine.build()
    built = run.strategy
    counts = {"steps": 0, "step_passes": 0, "trained": 0, "train_images": 0}
    step, train_experience = built.training_step, run.train_experience

    def counted_step(batch):
        before = passes.calls
        loss = step(batch)
        counts["step_passes"] += passes.calls - before
        counts["steps"] += 1
        counts["trained"] += len(batch.y)
        return loss

    def counted_experience(exp, log):
        before = passes.samples
        out = train_experience(exp, log)
        counts["train_images"] += passes.samples - before
        return out

    built.training_step, run.train_experience = counted_step, counted_experience
    with built.backbone.count_passes() as passes, contextlib.redirect_stdout(io.StringIO()):
        t0 = time.perf_counter()
        result = engine.run(run)
        counts["wall_s"] = time.perf_counter() - t0
    counts["run_images"] = passes.samples
    counts["acc_last"] = result["metrics"]["acc_last"]
    return counts


def main() -> None:
    torch.set_num_threads(1)
    root = tempfile.mkdtemp(prefix="prompt_passes_data_")
    measure(METHODS["dualprompt"], False, root)  # warm-up: first-run costs stay out of the table
    print(
        f"tiny ViT (vit_tiny_patch16_224, 32 px, random init), sklearn digits 5 x 2 classes, "
        f"32 train images per experience, {EPOCHS} epochs, batch 16, torch {torch.__version__}, 1 thread"
    )
    print(
        f"{'method':<12} {'variant':<12} {'steps':>5} {'passes/step':>11} {'train img/img':>13} "
        f"{'run images':>10} {'wall s':>7} {'acc_last':>8}"
    )
    for name, strategy in METHODS.items():
        rows = {variant: measure(strategy, variant == "pilot-style", root) for variant in ("clpeft", "pilot-style")}
        for variant, c in rows.items():
            print(
                f"{name:<12} {variant:<12} {c['steps']:>5} {c['step_passes'] / c['steps']:>11.2f} "
                f"{c['train_images'] / c['trained']:>13.2f} {c['run_images']:>10} {c['wall_s']:>7.1f} {c['acc_last']:>8.3f}"
            )
        ours, pilot = rows["clpeft"], rows["pilot-style"]
        print(
            f"{'':<12} {'ratio':<12} {'':>5} {ours['step_passes'] / pilot['step_passes']:>11.2f} "
            f"{ours['train_images'] / pilot['train_images']:>13.2f} {ours['run_images'] / pilot['run_images']:>10.2f} "
            f"{ours['wall_s'] / pilot['wall_s']:>7.2f}"
        )


if __name__ == "__main__":
    main()
