"""Augmentation-averaged predictions in one batched forward (CoTTA).

Wang et al., "Continual Test-Time Domain Adaptation", CVPR 2022
(https://arxiv.org/abs/2203.13591), eq. 4: the teacher's pseudo-label is the average of its
predictions on ``N`` random augmentations of the test batch,

    y'_aug = 1/N sum_{i=1..N} f_teacher(aug_i(x)),

(used when the source model's mean confidence is below a threshold), with CoTTA's augmentation
:class:`~clpeft.components.tta.augment.TTAugment` (one draw per augmentation for the whole
batch). The reference code runs a Python loop of ``N`` augment + forward calls;
:func:`augmentation_average` builds all ``N * B`` augmented images in one call and runs one
forward under ``torch.func.vmap`` over the ``N`` augmentations, so BatchNorm layers that
normalise with batch statistics still see each augmentation's batch separately: the result
equals the loop's (:func:`augmentation_average_loop`, kept as the reference) up to float
rounding. Stacking saves per-call overhead, which is what a GPU pays for; on a CPU the forward of
one large batch is slower than ``N`` smaller ones (measured), so there only the augmentation is
stacked.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from clpeft.components.tta.augment import TTAugment

STACK_ON_CPU = 32  # images (n * B) up to which one stacked forward beats per-augmentation forwards on a CPU


def augmentation_average(
    model: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    augment: TTAugment,
    n: int,
    generator: torch.Generator | None = None,
    stacked: bool | None = None,
) -> torch.Tensor:
    """Mean of ``model``'s logits over ``n`` augmentations of ``x``.

    ``stacked=True``: one augment call and one forward over all ``n * B`` images, vmapped over
    the augmentations (per-augmentation batch statistics). ``False`` runs
    :func:`augmentation_average_loop` (same draws, same result). ``None`` (default): the single
    forward on CUDA, and on a CPU for at most ``STACK_ON_CPU`` images in all; above that, on a
    CPU, one augment call over all ``n * B`` images, then one forward per augmentation, because
    there the cost of a convolution per image grows with the batch once activations outgrow the
    caches: ``benchmarks/tta_bench.py`` (``cnn`` backbone, 28x28 images, N = 16, one thread)
    measured the single forward 1.8x and 1.5x faster than the loop at B = 1 and 2 (per-call
    overhead dominates), even at B = 4, and 1.6x and 2.6x slower at B = 16 and 64, while the
    stacked augmentation alone is 1.5x, 2.6x and 5.7x faster than ``N`` calls at B = 64, 16 and 4
    (one 28x28 channel, minima of 5, one thread, 2026-12-06).
    """
    b = x.shape[0]
    if stacked is False:
        return augmentation_average_loop(model, x, augment, n, generator)
    params = augment.sample(n, x.shape, generator, x.device)
    images = augment.apply(x, params).view(n, b, *x.shape[1:])
    if stacked or (stacked is None and (x.is_cuda or n * b <= STACK_ON_CPU)):
        return torch.func.vmap(model, randomness="different")(images).mean(0)
    return torch.stack([model(images[i]) for i in range(n)]).mean(0)


def augmentation_average_loop(
    model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, augment: TTAugment, n: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """The reference: a Python loop of ``n`` augment + forward calls (CoTTA's code), drawing the
    same parameters as :func:`augmentation_average`."""
    params = augment.sample(n, x.shape, generator, x.device)
    outputs = [model(augment.apply(x, {k: v[i : i + 1] for k, v in params.items()})) for i in range(n)]
    return torch.stack(outputs).mean(0)
