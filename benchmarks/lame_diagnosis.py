"""Why LAME raises the error on the offline corrupted Fashion-MNIST stream (issue 6's TTA table).

LAME (Boudiaf et al., CVPR 2022) moves each test prediction towards those of its neighbours in
feature space (eq. 4 and 7), so it can only help when a sample's neighbours mostly share its
class. This script measures, per domain of the TTA table's stream and for the source model's
features under source (running) and test-batch BatchNorm statistics:

* the error of the model's own predictions and of LAME's corrected ones (kNN affinity, ``k``),
* the k-nearest-neighbour purity: the fraction of each sample's ``k`` neighbours (the affinity's
  edges) with the sample's true class (labels are read here for the diagnosis only),
* how many predictions LAME fixes (wrong -> right) and breaks (right -> wrong),

once with the stream's i.i.d. order (the table's setting: ~6 images per class in a batch of 64)
and once with each domain sorted by class, the non-i.i.d. order LAME was designed for (a batch
then holds one or two classes).

It loads the source model that ``benchmarks/tta_fscil_tables.py`` trained (its ``tta_source``
run) and reads the stream of ``configs/tta/fmnist_continual_lame.yaml`` with the same counts.

    OMP_NUM_THREADS=2 python benchmarks/lame_diagnosis.py --source /tmp/tta_fscil/tta_source \\
        --train-per-class 500 --test-per-class 100
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
import yaml

from clpeft import checkpoint, config
from clpeft.components.heads.classifiers import LinearHead
from clpeft.components.tta.laplacian_adjustment import affinity, laplacian_adjustment
from clpeft.components.tta.online_adaptation import batch_norm_layers, use_batch_statistics

ROOT = Path(__file__).resolve().parents[1]


def source_model(cfg, run_dir: Path, input_shape) -> tuple[torch.nn.Module, torch.nn.Module]:
    state = checkpoint.load_latest(run_dir / "source")[1]["strategy"]
    backbone = cfg.backbone.cls(input_shape=input_shape, **cfg.backbone.params)
    backbone.load_state_dict({k[len("backbone.") :]: v for k, v in state.items() if k.startswith("backbone.")})
    head = LinearHead(backbone.feature_dim, state["head.weight"].shape[0])
    head.load_state_dict({k[len("head.") :]: v for k, v in state.items() if k.startswith("head.")})
    return backbone.eval(), head.eval()


@torch.no_grad()
def diagnose(backbone, head, x: torch.Tensor, y: torch.Tensor, k: int, batch_size: int) -> dict[str, float]:
    counts = dict(n=0, model_wrong=0, lame_wrong=0, fixed=0, broken=0, pure=0.0)
    for i in range(0, len(y), batch_size):
        xb, yb = x[i : i + batch_size], y[i : i + batch_size]
        features = backbone(xb)
        probs = head(features).softmax(1)
        kernel = affinity(features, "knn", k)
        z = laplacian_adjustment(probs, kernel)
        model_ok, lame_ok = probs.argmax(1) == yb, z.argmax(1) == yb
        counts["n"] += len(yb)
        counts["model_wrong"] += int((~model_ok).sum())
        counts["lame_wrong"] += int((~lame_ok).sum())
        counts["fixed"] += int((lame_ok & ~model_ok).sum())
        counts["broken"] += int((model_ok & ~lame_ok).sum())
        same = (yb[:, None] == yb[None, :]).float()
        counts["pure"] += float(((kernel * same).sum(1) / kernel.sum(1).clamp_min(1)).sum())
    n = counts.pop("n")
    return {
        "model error": counts["model_wrong"] / n,
        "LAME error": counts["lame_wrong"] / n,
        "kNN purity": counts["pure"] / n,
        "fixed": counts["fixed"] / n,
        "broken": counts["broken"] / n,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", type=Path, required=True, help="the tables script's tta_source run directory")
    parser.add_argument("--train-per-class", type=int, default=1000)
    parser.add_argument("--test-per-class", type=int, default=200)
    parser.add_argument("--knn", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    raw = yaml.safe_load((ROOT / "configs/tta/fmnist_continual_lame.yaml").read_text())
    raw["scenario"].update(train_per_class=args.train_per_class, test_per_class=args.test_per_class)
    cfg = config.resolve(raw)
    scenario = cfg.scenario.cls(seed=cfg.seed, **cfg.scenario.params)
    domains = [e for e in scenario.experiences() if e.train is None]
    backbone, head = source_model(cfg, args.source, scenario.input_shape)
    data = [exp.test.load() for exp in domains]
    rows = []
    for statistics in ("source", "test batch"):
        if statistics == "test batch":
            use_batch_statistics(batch_norm_layers(backbone))
        for order in ("i.i.d.", "sorted by class"):
            totals: dict[str, float] = {}
            for x, y in data:
                if order == "sorted by class":
                    index = torch.sort(y, stable=True).indices
                    x, y = x[index], y[index]
                for key, value in diagnose(backbone, head, x, y, args.knn, args.batch_size).items():
                    totals[key] = totals.get(key, 0.0) + value / len(domains)
            rows.append((statistics, order, totals))
            print(statistics, order, {k: round(v, 4) for k, v in totals.items()}, flush=True)
    print(f"\n| BatchNorm statistics | stream order | model error | LAME error (kNN, k = {args.knn}) | kNN purity | fixed | broken |")
    print("|---|---|---|---|---|---|---|")
    for statistics, order, t in rows:
        print(
            f"| {statistics} | {order} | {t['model error']:.3f} | {t['LAME error']:.3f} | {t['kNN purity']:.3f} | "
            f"{t['fixed']:.3f} | {t['broken']:.3f} |"
        )


if __name__ == "__main__":
    main()
