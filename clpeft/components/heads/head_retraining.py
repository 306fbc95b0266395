"""A head re-trained on fixed features with SGD under PyTorch's ``ConstantLR`` (DUCT's head re-training).

Zhou, Cai, Ye, Zhang & Zhan, "Dual Consolidation for Pre-Trained Model-Based Domain-Incremental
Learning", CVPR 2025 (https://arxiv.org/abs/2410.00911), Sec. 4.3: after the backbone is merged,
the new task's head is trained again on it. LAMDA-PILOT's ``models/duct.py`` (``_train(mode='retrain')``)
runs SGD over the task's batches under ``ConstantLR`` with its defaults: the learning rate times 1/3
for the first 5 epochs (:func:`constant_lr_factor`, which its main training runs under too).
The backbone is fixed here, so its features are computed once instead of once per epoch.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


def constant_lr_factor(groups: list[dict], epoch: int, factor: float, epochs: int) -> None:
    """At the start of ``epoch``: ``ConstantLR(factor, total_iters=epochs)`` on the optimizer ``groups``.

    The groups' learning rates are multiplied by ``factor`` at epoch 0 and divided by it at epoch
    ``epochs`` (PyTorch's chainable form, so the values equal the scheduler's; 0 epochs: no factor).
    """
    if epochs and epoch in (0, epochs):
        scale = factor if epoch == 0 else 1.0 / factor
        for group in groups:
            group["lr"] = group["lr"] * scale


def retrain_head(
    head: nn.Module,
    features: torch.Tensor,
    labels: torch.Tensor,
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    epochs: int,
    batch_size: int,
    lr: float,
    weight_decay: float,
    warmup: tuple[float, int] = (1.0, 0),
    momentum: float = 0.9,
    generator: torch.Generator | None = None,
) -> None:
    """Train ``head``'s trainable parameters (in place) on ``(features, labels)``.

    Each epoch shuffles by ``randperm`` (from ``generator``) into mini-batches of ``batch_size``;
    ``loss(head(x), y)``, SGD with ``momentum`` and ``weight_decay``, ``warmup = (factor, epochs)``
    of :func:`constant_lr_factor`. Float32, autocast off.
    """
    params = [p for p in head.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=weight_decay)
    with torch.enable_grad(), torch.autocast(features.device.type, enabled=False):
        for epoch in range(epochs):
            constant_lr_factor(optimizer.param_groups, epoch, *warmup)
            for batch in torch.randperm(len(labels), generator=generator, device=labels.device).split(batch_size):
                value = loss(head(features[batch].float()), labels[batch])
                optimizer.zero_grad(set_to_none=True)
                value.backward()
                optimizer.step()
