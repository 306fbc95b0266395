"""A contrastive regulariser that keeps a batch's features apart from the stored class means and each other.

MOS (Sun et al., "MOS: Model Surgery for Pre-Trained Model-Based Class-Incremental Learning",
AAAI 2025, https://arxiv.org/abs/2412.09441; LAMDA-PILOT ``models/mos.py`` ``orth_loss``): the rows
``M = [mu_1; ...; mu_C; h_1; ...; h_B]`` (old class means, then the batch's features) give
``S = M M^T / tau`` and the loss is the cross-entropy of each row of ``S`` against its own index,
i.e. every vector should be most similar to itself (``tau = 0.8``)::

    L = -1/(C + B) sum_i log softmax(S_i)_i
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def prototype_contrast(features: torch.Tensor, prototypes: torch.Tensor | None = None, temperature: float = 0.8) -> torch.Tensor:
    """``L`` for ``features`` ``(B, D)`` and the stored class means ``prototypes`` ``(C, D)`` (none: ``C = 0``)."""
    rows = features if prototypes is None or not len(prototypes) else torch.cat([prototypes.to(features), features])
    similarity = rows @ rows.T / temperature
    return F.cross_entropy(similarity, torch.arange(len(rows), device=rows.device))
