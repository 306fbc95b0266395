"""LUCIR's inter-class separation: a margin ranking loss on the exemplars of old classes.

Hou et al., "Learning a Unified Classifier Incrementally via Rebalancing", CVPR 2019, eq. 8: for an
old-class sample, its ground-truth class's cosine similarity must exceed each of its ``K`` highest
new-class cosines by the margin ``m``:
``L_mr = sum_k max(m - <w_y, f> + <w_k, f>, 0)``, averaged over the old-class samples of the batch
and their ``K`` hard negatives (``nn.MarginRankingLoss``'s mean, as the official code and Mammoth's
``lucir_batch_hard_triplet_loss``). A batch without old-class samples gives 0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def margin_ranking_loss(cosines: torch.Tensor, labels: torch.Tensor, n_old: int, k: int, margin: float) -> torch.Tensor:
    """Eq. 8 on ``cosines`` (unscaled, ``(B, C)``): classes ``< n_old`` are old, the rest new."""
    old = labels < n_old
    if not old.any():
        return cosines.new_zeros(())
    positive = cosines[old].gather(1, labels[old, None]).expand(-1, k)
    hardest = cosines[old, n_old:].topk(k, dim=1).values
    return F.margin_ranking_loss(positive.reshape(-1), hardest.reshape(-1), torch.ones_like(hardest.reshape(-1)), margin=margin)
