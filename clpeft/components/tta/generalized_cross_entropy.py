"""The generalized cross-entropy of Zhang & Sabuncu, robust to noisy (pseudo-)labels (RPL's loss).

Zhang & Sabuncu, "Generalized Cross Entropy Loss for Training Deep Neural Networks with Noisy
Labels", NeurIPS 2018 (https://arxiv.org/abs/1805.07836), eq. 6: ``L_q(p, y) = (1 - p_y^q) / q``,
cross-entropy as ``q -> 0`` and the mean absolute error at ``q = 1``. Rusak et al. (RPL, TMLR 2022)
minimise it on the model's own hard predictions.
"""

from __future__ import annotations

import torch


def generalized_cross_entropy(logits: torch.Tensor, targets: torch.Tensor | None = None, q: float = 0.8) -> torch.Tensor:
    """Per-sample ``(1 - p_y^q) / q``, shape ``(B,)``; ``targets`` default to the argmax (pseudo-labels)."""
    probs = logits.softmax(1)
    if targets is None:
        targets = probs.argmax(1)
    return (1.0 - probs.gather(1, targets.view(-1, 1)).squeeze(1) ** q) / q
