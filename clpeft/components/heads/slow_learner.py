"""SLCA's slow learner: the backbone at a small fraction of the head's learning rate, new head rows truncated-normal.

Zhang, Wang, Kang, Chen & Wei, "SLCA: Slow Learner with Classifier Alignment for Continual
Learning on a Pre-trained Model", ICCV 2023 (https://arxiv.org/abs/2303.05118), Sec. 4.1; the
official ``SimpleContinualLinear`` draws each new task's rows from a truncated normal (std 0.02)
with zero bias. Shared by the methods built on SLCA's training (CoFiMA).
"""

from __future__ import annotations

import torch
from torch import nn

from clpeft.components.heads.classifiers import LinearHead


def slow_learner_groups(backbone: nn.Module, head: nn.Module, lr: float, backbone_lr_scale: float) -> list[dict]:
    """Optimizer groups: the trainable backbone at ``lr * backbone_lr_scale``, the head at ``lr``."""
    return [{"params": [p for p in backbone.parameters() if p.requires_grad], "lr": lr * backbone_lr_scale},
            {"params": list(head.parameters()), "lr": lr}]


@torch.no_grad()
def new_rows_truncated_normal(head: LinearHead, n_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Grow ``head`` to ``n_classes`` with truncated-normal rows (std 0.02) and zero biases; returns
    copies of the rows it had before (the older classes', which SLCA keeps fixed while training)."""
    known = head.n_classes
    head.grow_to(n_classes)
    nn.init.trunc_normal_(head.weight[known:], std=0.02)
    head.bias[known:] = 0.0
    return head.weight[:known].detach().clone(), head.bias[:known].detach().clone()
