"""HiDe-Prompt's task-identity inference (TII): a classifier on the frozen model's features whose class names the task.

Wang, Xie, Zhang, Huang, Su & Zhu, "Hierarchical Decomposition of Prompt-Based Continual
Learning: Rethinking Obscured Sub-optimality", NeurIPS 2023 (https://arxiv.org/abs/2310.07234),
Sec. 4 (task-identity inference). The uninstructed representation ``h(x)`` (the frozen
pre-trained model's [CLS] feature, in clpeft the cached query) goes through the official
``original_model``'s head: a residual MLP (``MlpMapping`` with ``original_model_mlp_structure``
hidden widths, ``[2]``: ``LayerNorm(h + W_2 GELU(W_1 h))``) and a linear layer over the classes
seen so far. The predicted class's task selects the prompt: ``t_hat = task(argmax_c z_c)``.

Training (``engines/hide_tii_engine.py``): per task, Adam on the MLP and the linear layer,
cross-entropy over the current task's classes (``train_mask``), gradient norm clipped; then the
features' class statistics (:class:`~clpeft.components.heads.centroid_statistics.CentroidStatistics`)
and, from the second task on, task-adaptive prediction of the MLP and linear layer together on
features replayed from them. Linear layers start as timm's ViT init (truncated normal, std
0.02, zero bias).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
from torch import nn

from clpeft.components.heads.centroid_statistics import CentroidStatistics
from clpeft.components.heads.class_mask import ClassMask
from clpeft.components.heads.classifiers import LinearHead
from clpeft.components.heads.slow_learner import new_rows_truncated_normal


class ResidualMlp(nn.Module):
    """The official ``MlpMapping``: ``LayerNorm(h + MLP(h))`` with hidden widths ``D * ratio``.

    Linear layers with GELU between them; with two or more hidden layers, the middle one is
    followed by a LayerNorm instead of GELU (the official rule). Dropout is omitted (the official
    runs use 0).
    """

    def __init__(self, dim: int, ratios: Sequence[int] = (2,)):
        super().__init__()
        widths = [dim, *(dim * r for r in ratios), dim]
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(widths[:-1], widths[1:])):
            layers.append(nn.Linear(a, b))
            if i < len(ratios):
                layers.append(nn.LayerNorm(b) if 0 < i == len(ratios) // 2 else nn.GELU())
        self.net = nn.Sequential(*layers)
        self.norm = nn.LayerNorm(dim)
        for layer in self.net:
            if isinstance(layer, nn.Linear):
                nn.init.trunc_normal_(layer.weight, std=0.02)
                nn.init.zeros_(layer.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.norm(h + self.net(h))


class TaskIdentityInference(nn.Module):
    """A residual MLP and a growing linear classifier on frozen features; the argmax class gives the task.

    Args:
        dim: feature dimension of the frozen model.
        mlp_ratios: hidden widths of the MLP as multiples of ``dim`` (official ``[2]``).
        n_centroids: k-means clusters per class of the statistics for task-adaptive prediction.
    """

    def __init__(self, dim: int, mlp_ratios: Sequence[int] = (2,), n_centroids: int = 10):
        super().__init__()
        self.mlp = ResidualMlp(dim, mlp_ratios)
        self.head = LinearHead(dim)
        self.statistics = CentroidStatistics(dim, n_centroids)

    def grow_to(self, n_classes: int) -> None:
        """Add output rows (truncated normal, std 0.02, zero bias) up to ``n_classes``."""
        new_rows_truncated_normal(self.head, n_classes)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Class logits of frozen features."""
        return self.head(self.mlp(features))

    @torch.no_grad()
    def infer(self, features: torch.Tensor) -> torch.Tensor:
        """``(B,)`` task of the most likely class; task 0 before any task has statistics."""
        if not self.statistics.n_classes:
            return torch.zeros(len(features), dtype=torch.long, device=features.device)
        return self.statistics.task_of_class.to(features.device)[self(features).argmax(1)]

    def fit(
        self,
        epochs: Callable[[], Iterable[tuple[torch.Tensor, torch.Tensor]]],
        n_epochs: int,
        classes: Sequence[int],
        lr: float,
        clip_grad: float | None = 1.0,
        train_mask: bool = True,
    ) -> list[float]:
        """Train on a task's ``(features, labels)`` batches (``epochs()`` gives one epoch's) with Adam; every step's loss."""
        params = [p for p in (*self.mlp.parameters(), *self.head.parameters())]
        optimizer = torch.optim.Adam(params, lr=lr)
        mask = ClassMask(train_mask)
        mask.start(classes)
        losses = []
        self.train()
        with torch.enable_grad():
            for _ in range(n_epochs):
                for features, labels in epochs():
                    loss = mask.loss(self(features), labels)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    if clip_grad is not None:
                        torch.nn.utils.clip_grad_norm_(params, clip_grad)
                    optimizer.step()
                    losses.append(loss.item())
        return losses
