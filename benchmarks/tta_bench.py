"""Test-time adaptation speed: augmentation averaging and Tent's per-batch overhead.

Two side-by-side measurements in one process, on the small BatchNorm CNN (``cnn`` backbone,
widths 16/32/64) and 28x28 ``uint8`` images (Fashion-MNIST-shaped random pixels: timing does not
depend on the content):

(a) CoTTA's augmentation-averaged teacher prediction over ``N`` augmentations with BatchNorm on
    batch statistics: ``stacked`` (:func:`clpeft.components.tta.augment_average.augmentation_average`
    with ``stacked=True``: one augment call over ``N * B`` images and one ``vmap``-ed forward, the
    CUDA default), ``CPU default`` (the same up to ``STACK_ON_CPU`` images, above it one augment call, then one forward per augmentation) against
    ``loop`` (the reference code's Python loop of ``N`` augment + forward calls,
    :func:`~clpeft.components.tta.augment_average.augmentation_average_loop`). All draw the same
    augmentations; the largest difference from the loop's output is printed. Ratios = loop time
    / variant time (> 1: the variant is faster).

(b) Tent images/s: the ``tent`` strategy's ``adapt`` against a plain PyTorch loop doing the same
    updates as the authors' code (BatchNorm without running statistics, Adam on the BatchNorm
    affine parameters, entropy, backward, step). Same initial weights and batches; the final
    parameters of the two must agree (checked). Ratio = plain / clpeft images/s (the overhead
    factor, 1.0 = none).

Every variant runs once untimed, then ``--repeats`` rounds with the order alternating; the
table gives medians of CPU time (``time.process_time``: all threads of this process), which a
shared machine's other processes disturb far less than wall-clock time. Defaults finish in well under 3 minutes on one CPU thread.

    python benchmarks/tta_bench.py                       # 1 thread, N=16, B=4, 16 and 64
    python benchmarks/tta_bench.py --threads 2 --batch-sizes 4,16,64 --repeats 7
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import time

import torch
from torch import nn

from clpeft.backbones.cnn import CNNBackbone
from clpeft.components.tta.augment_average import TTAugment, augmentation_average, augmentation_average_loop
from clpeft.components.tta.online_adaptation import batch_norm_layers, classifier, use_batch_statistics
from clpeft.experience import Experience
from clpeft.strategies.tent import Tent

WIDTHS = [16, 32, 64]
SHAPE = (1, 28, 28)


def _images(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (n, *SHAPE), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def _timed(fn) -> float:
    t0 = time.process_time()
    fn()
    return time.process_time() - t0


def bench_augmentation(batch_sizes: list[int], n: int, repeats: int) -> list[dict]:
    torch.manual_seed(0)
    backbone = CNNBackbone(SHAPE, widths=WIDTHS)
    teacher = classifier(backbone, nn.Linear(backbone.feature_dim, 10)).eval()
    use_batch_statistics(batch_norm_layers(teacher))
    augment = TTAugment()
    rows = []
    for b in batch_sizes:
        x = _images(b, b)
        variants = {
            "stacked": lambda: augmentation_average(teacher, x, augment, n, torch.Generator().manual_seed(1), stacked=True),
            "cpu_default": lambda: augmentation_average(teacher, x, augment, n, torch.Generator().manual_seed(1)),
            "loop": lambda: augmentation_average_loop(teacher, x, augment, n, torch.Generator().manual_seed(1)),
        }
        with torch.no_grad():
            diff = max(float((variants[k]() - variants["loop"]()).abs().max()) for k in ("stacked", "cpu_default"))
            times = {k: [] for k in variants}
            for r in range(repeats):
                for k in list(variants) if r % 2 == 0 else list(reversed(variants)):
                    times[k].append(_timed(variants[k]))
        med = {k: statistics.median(v) for k, v in times.items()}
        rows.append(
            {
                "B": b,
                "stacked_s": med["stacked"],
                "cpu_default_s": med["cpu_default"],
                "loop_s": med["loop"],
                "ratio": med["loop"] / med["stacked"],
                "ratio_default": med["loop"] / med["cpu_default"],
                "max_abs_diff": diff,
            }
        )
    return rows


def _plain_tent(model: nn.Module, lr: float):
    """The authors' recipe, written directly."""
    model.train()
    model.requires_grad_(False)
    params = []
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.requires_grad_(True)
            m.track_running_stats = False
            m.running_mean = m.running_var = None
            params += [m.weight, m.bias]
    opt = torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999))

    def step(x):
        out = model(x)
        loss = -(out.softmax(1) * out.log_softmax(1)).sum(1).mean(0)
        loss.backward()
        opt.step()
        opt.zero_grad()
        return out

    return step


def bench_tent(batch_size: int, n_batches: int, repeats: int, lr: float = 1e-3) -> dict:
    torch.manual_seed(0)
    batches = [_images(batch_size, 100 + i) for i in range(n_batches)]
    source = Tent(CNNBackbone(SHAPE, widths=WIDTHS), lr=lr)
    source.before_experience(Experience(0, None, None, list(range(10)), list(range(10))))
    tta_exp = Experience(1, None, None, [], list(range(10)))

    def run_clpeft():
        s = copy.deepcopy(source)
        s.before_experience(tta_exp)
        t0 = time.process_time()
        with torch.enable_grad():
            for x in batches:
                s.adapt(x)
        return time.process_time() - t0, classifier(s.backbone, s.head)

    def run_plain():
        model = copy.deepcopy(classifier(source.backbone, source.head))
        step = _plain_tent(model, lr)
        t0 = time.process_time()
        for x in batches:
            step(x)
        return time.process_time() - t0, model

    _, a = run_clpeft()
    _, b = run_plain()
    worst = max(float((p.detach() - q.detach()).abs().max()) for p, q in zip(a.parameters(), b.parameters()))
    if worst > 1e-4:
        raise AssertionError(f"tent and the plain loop disagree (max parameter difference {worst})")
    times = {"clpeft": [], "plain": []}
    for r in range(repeats):
        for k, fn in [("clpeft", run_clpeft), ("plain", run_plain)] if r % 2 == 0 else [("plain", run_plain), ("clpeft", run_clpeft)]:
            times[k].append(fn()[0])
    images = batch_size * n_batches
    ips = {k: images / statistics.median(v) for k, v in times.items()}
    return {
        "B": batch_size,
        "batches": n_batches,
        "clpeft_img_s": ips["clpeft"],
        "plain_img_s": ips["plain"],
        "overhead": ips["plain"] / ips["clpeft"],
        "max_param_diff": worst,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--n-augmentations", type=int, default=16)
    parser.add_argument("--batch-sizes", default="4,16,64", help="batch sizes of the augmentation benchmark")
    parser.add_argument("--tent-batch-size", type=int, default=64)
    parser.add_argument("--tent-batches", type=int, default=30)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {args.threads} thread(s), "
        f"cnn widths {WIDTHS}, images {SHAPE}, medians of {args.repeats}"
    )

    print(f"\n(a) augmentation averaging, N = {args.n_augmentations}")
    print("| B | stacked (s) | CPU default (s) | loop (s) | loop / stacked | loop / CPU default | max abs diff |")
    print("|---|---|---|---|---|---|---|")
    for row in bench_augmentation([int(b) for b in args.batch_sizes.split(",")], args.n_augmentations, args.repeats):
        print(
            f"| {row['B']} | {row['stacked_s']:.3f} | {row['cpu_default_s']:.3f} | {row['loop_s']:.3f} | {row['ratio']:.2f}x | "
            f"{row['ratio_default']:.2f}x | {row['max_abs_diff']:.1e} |"
        )

    row = bench_tent(args.tent_batch_size, args.tent_batches, args.repeats)
    print(f"\n(b) tent, {row['batches']} batches of {row['B']}")
    print("| clpeft tent (img/s) | plain loop (img/s) | overhead (plain / clpeft) | max param diff |")
    print("|---|---|---|---|")
    print(f"| {row['clpeft_img_s']:.0f} | {row['plain_img_s']:.0f} | {row['overhead']:.3f}x | {row['max_param_diff']:.1e} |")


if __name__ == "__main__":
    main()
