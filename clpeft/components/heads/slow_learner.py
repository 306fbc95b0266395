"""SLCA's slow learner: the backbone at a small fraction of the head's learning rate, new head rows truncated-normal.

Zhang, Wang, Kang, Chen & Wei, "SLCA: Slow Learner with Classifier Alignment for Continual
Learning on a Pre-trained Model", ICCV 2023 (https://arxiv.org/abs/2303.05118), Sec. 4.1; the
official ``SimpleContinualLinear`` draws each new task's rows from a truncated normal (std 0.02)
with zero bias. Shared by the methods built on SLCA's training (SLCA, CoFiMA).
"""

from __future__ import annotations

import torch
from torch import nn

from clpeft.components.heads.classifiers import LinearHead


def slow_learner_groups(backbone: nn.Module, head: nn.Module, lr: float, backbone_lr_scale: float) -> list[dict]:
    """Optimizer groups: the trainable backbone at ``lr * backbone_lr_scale``, the head at ``lr``."""
    return [
        {"params": [p for p in backbone.parameters() if p.requires_grad], "lr": lr * backbone_lr_scale},
        {"params": list(head.parameters()), "lr": lr},
    ]


@torch.no_grad()
def new_rows_truncated_normal(head: LinearHead, n_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Grow ``head`` to ``n_classes`` with truncated-normal rows (std 0.02) and zero biases; returns
    copies of the rows it had before (the older classes', which SLCA keeps fixed while training)."""
    known = head.n_classes
    head.grow_to(n_classes)
    nn.init.trunc_normal_(head.weight[known:], std=0.02)
    head.bias[known:] = 0.0
    return head.weight[:known].detach().clone(), head.bias[:known].detach().clone()


class SlowLearnerHead:
    """SLCA's head during a task: new rows truncated-normal, and, with the training-time class mask,
    the older classes' rows put back after every step (the step's weight decay and momentum move
    them; the official code freezes them)."""

    def __init__(self):
        self.old_rows: tuple[torch.Tensor, torch.Tensor] | None = None

    def start(self, head: LinearHead, n_classes: int, hold_old_rows: bool) -> None:
        """Grow ``head`` for a new task; keep its older rows fixed until :meth:`finish` if asked."""
        rows = new_rows_truncated_normal(head, n_classes)
        self.old_rows = rows if hold_old_rows else None

    @torch.no_grad()
    def restore(self, head: LinearHead) -> None:
        """Put the held rows back (after an optimizer step)."""
        if self.old_rows is not None:
            weight, bias = self.old_rows
            head.weight[: len(weight)] = weight
            head.bias[: len(bias)] = bias

    def finish(self) -> None:
        """The task is trained: stop holding rows."""
        self.old_rows = None
