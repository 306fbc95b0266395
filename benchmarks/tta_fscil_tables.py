"""The TTA and FSCIL tables of issue 6's Verification section, run through the real engine.

1. TTA: the offline Fashion-MNIST setup of ``configs/tta/fmnist_continual_*.yaml`` (continual
   mode, severity 5, the on-the-fly corruptions, the small BatchNorm ResNet), for every TTA
   strategy, plus the ablations of ``TTA_VARIANTS`` (``tent`` with ``scenario.reset_each_domain: true``,
   RMT without its source-data terms, LAME and Dual Teacher variants). The source model is trained
   once (the ``source`` run) and every other run loads it through ``scenario.source_checkpoint``,
   so all methods adapt the same weights. Per method: mean online error, error per domain,
   ``timing.s_per_batch`` and wall time.
2. FSCIL: the offline few-shot preset (``configs/fscil/<preset>.yaml``) with ``fscil_proto``,
   ``simplecil``, ``finetune`` and ``replay``: per-session accuracy, base / novel accuracy and
   their harmonic mean after the last session (``clpeft.metrics.few_shot_summary``).

Per-class counts may be shrunk from the shipped configs (``--tta-train-per-class``,
``--tta-test-per-class``) to fit a CPU budget; every other setting is read from the YAML files.
``--reuse`` reads back the TTA runs already finished in ``--out`` (their wall time is then not
known) and resumes an interrupted one from its last finished domain.

    OMP_NUM_THREADS=2 python benchmarks/tta_fscil_tables.py --out /tmp/tta_fscil
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
import yaml

from clpeft import checkpoint, config
from clpeft.engine import Engine

ROOT = Path(__file__).resolve().parents[1]
TTA_METHODS = ["source", "bn_adapt", "tent", "eata", "cotta", "rmt", "lame", "dual_teacher"]
# (label, strategy, strategy overrides, reset each domain): the ablations behind the table's notes
TTA_VARIANTS = [
    ("tent (reset)", "tent", {}, True),
    ("rmt, self-training only", "rmt", {"lambda_cont": 0.0, "lambda_ce_src": 0.0, "warmup_samples": 0}, False),
    ("lame, rbf affinity", "lame", {"affinity": "rbf"}, False),
    ("lame, test-batch BN statistics", "lame", {"batch_statistics": True}, False),
    ("dual_teacher, all parameters", "dual_teacher", {"params": "all"}, False),
    ("dual_teacher, all parameters, lr 1e-4", "dual_teacher", {"params": "all", "lr": 1e-4}, False),
]
FSCIL_METHODS = ["fscil_proto", "simplecil", "finetune", "replay"]
QUIET = {"tensorboard": False, "progress": "never"}


def run(cfg: dict, out_dir: Path) -> tuple[dict, float]:
    """One engine run on the CPU; returns metrics.json's content and the wall time."""
    t0 = time.perf_counter()
    result = Engine(config.resolve(cfg), out_dir, device="cpu").run()
    return result, time.perf_counter() - t0


def tta_config(method: str, args) -> dict:
    cfg = yaml.safe_load((ROOT / f"configs/tta/fmnist_continual_{method}.yaml").read_text())
    cfg["scenario"].update(train_per_class=args.tta_train_per_class, test_per_class=args.tta_test_per_class)
    cfg["logging"] = dict(QUIET)
    return cfg


def tta_run(cfg: dict, run_dir: Path, reuse: bool) -> tuple[dict, float | None]:
    """``run``, or with ``reuse`` a finished run's metrics.json (wall time None) or an interrupted run resumed."""
    if reuse and (run_dir / "metrics.json").is_file():
        return json.loads((run_dir / "metrics.json").read_text()), None
    if not (reuse and (run_dir / "config.yaml").is_file()):
        return run(cfg, run_dir)
    t0 = time.perf_counter()
    # force: a setting that only changed its default since the run began (training-only) does not stop it
    result = Engine(config.resolve(cfg), run_dir, device="cpu", resume=True, force=True).run()
    return result, time.perf_counter() - t0


def tta_table(args, out: Path) -> list[dict]:
    rows = []
    source_dir = out / "tta_source"
    runs = [(m, m, {}, False) for m in TTA_METHODS] + (TTA_VARIANTS if args.variants else [])
    for i, (label, method, overrides, reset) in enumerate(runs):
        cfg = tta_config(method, args)
        cfg["strategy"].update(overrides)
        # every method adapts the one source model (eata and rmt still get the clean source data)
        if method != "source":
            cfg["scenario"]["source_checkpoint"] = str(source_dir)
        if reset:
            cfg["scenario"]["reset_each_domain"] = True
        run_dir = source_dir if method == "source" else out / f"tta_{i:02d}_{method}"
        result, wall = tta_run(cfg, run_dir, args.reuse)
        m = result["metrics"]
        same = None if method == "source" else same_source(source_dir, run_dir)
        rows.append(
            {
                "method": label,
                "same_source": same,
                "error_mean": m["error_mean"],
                "error_per_domain": m["error_per_domain"],
                "domains": result["domains"],
                "s_per_batch": result["timing"]["s_per_batch"],
                "train_s": result["timing"]["train_s"],
                "wall_s": wall,
            }
        )
        print(
            f"[tta] {label:16s} mean error {m['error_mean']:.4f}  s/batch {result['timing']['s_per_batch']:.4f}  "
            f"wall {_seconds(wall)}s  same source weights: {same}",
            flush=True,
        )
    return rows


def same_source(reference: Path, run_dir: Path) -> bool:
    """Whether the backbone and head a run adapted from equal, bitwise, the shared source model's."""
    ref = checkpoint.load_latest(reference / "source")[1]["strategy"]
    got = checkpoint.load_latest(run_dir / "source")[1]["strategy"]
    keys = [k for k in ref if k.startswith(("backbone.", "head."))]
    return all(k in got and torch.equal(ref[k], got[k]) for k in keys)


def _seconds(wall: float | None) -> str:
    return "-" if wall is None else f"{wall:.1f}"


def fscil_table(args, out: Path) -> list[dict]:
    rows = []
    for method in FSCIL_METHODS:
        cfg = yaml.safe_load((ROOT / f"configs/fscil/{args.fscil_preset}.yaml").read_text())
        cfg["strategy"] = {"name": method}
        cfg["logging"] = dict(QUIET)
        try:
            result, wall = run(cfg, out / f"fscil_{method}")
        except Exception as exc:  # report a method that cannot run on this preset instead of stopping
            print(f"[fscil] {method}: failed: {exc}", flush=True)
            rows.append({"method": method, "error": str(exc)})
            continue
        m = result["metrics"]
        keys = ["session_acc", "session_acc_mean", "performance_drop", "base_acc_last", "novel_acc_last", "harmonic_mean_last"]
        rows.append({"method": method, "wall_s": wall, **{k: m.get(k) for k in keys}})
        print(
            f"[fscil] {method:12s} sessions {[round(a, 3) for a in m['session_acc']]}  "
            f"H {m.get('harmonic_mean_last', float('nan')):.3f}  wall {wall:.1f}s",
            flush=True,
        )
    return rows


def markdown(tta: list[dict], fscil: list[dict]) -> str:
    lines = []
    if tta:
        domains = tta[0]["domains"]
        lines += [
            "| method | mean error | " + " | ".join(d.split("@")[0] for d in domains) + " | s/batch | wall s |",
            "|---" * (len(domains) + 4) + "|",
        ]
        for r in tta:
            per = " | ".join(f"{e:.3f}" for e in r["error_per_domain"])
            lines.append(f"| {r['method']} | **{r['error_mean']:.4f}** | {per} | {r['s_per_batch']:.4f} | {_seconds(r['wall_s'])} |")
        lines.append("")
    if fscil:
        n = max(len(r.get("session_acc") or []) for r in fscil)
        lines += [
            "| method | " + " | ".join(f"S{i}" for i in range(n)) + " | mean | drop | base (last) | novel (last) | H (last) | wall s |",
            "|---" * (n + 7) + "|",
        ]
        for r in fscil:
            if "error" in r:
                lines.append(f"| {r['method']} | failed: {r['error']} |")
                continue
            sess = " | ".join(f"{a:.3f}" for a in r["session_acc"])
            lines.append(
                f"| {r['method']} | {sess} | {r['session_acc_mean']:.3f} | {r['performance_drop']:.3f} | "
                f"{r['base_acc_last']:.3f} | {r['novel_acc_last']:.3f} | {r['harmonic_mean_last']:.3f} | "
                f"{r['wall_s']:.1f} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the run directories and tables.json")
    parser.add_argument("--tta-train-per-class", type=int, default=1000)
    parser.add_argument("--tta-test-per-class", type=int, default=200)
    parser.add_argument("--fscil-preset", default="fmnist_fscil_proto")
    parser.add_argument("--skip", choices=["tta", "fscil"], default=None)
    parser.add_argument("--no-variants", dest="variants", action="store_false", help="leave out the ablation rows (TTA_VARIANTS)")
    parser.add_argument("--reuse", action="store_true", help="read back finished TTA runs in --out and resume an interrupted one")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"torch threads {torch.get_num_threads()}; args {vars(args)}", flush=True)
    tta = [] if args.skip == "tta" else tta_table(args, args.out)
    fscil = [] if args.skip == "fscil" else fscil_table(args, args.out)
    (args.out / "tables.json").write_text(json.dumps({"tta": tta, "fscil": fscil}, indent=1))
    print(markdown(tta, fscil))


if __name__ == "__main__":
    sys.exit(main())
