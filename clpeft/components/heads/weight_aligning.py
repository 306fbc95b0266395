"""Weight Aligning: rescale the new classes' classifier weights to the old classes' norm.

Zhao et al., "Maintaining Discrimination and Fairness in Class Incremental Learning", CVPR 2020
(https://arxiv.org/abs/1911.07053), eq. 5-6: after an incremental stage the new classes' weight
vectors are multiplied by ``gamma = Mean(||w_old||) / Mean(||w_new||)``, so that both groups have the
same mean norm and the bias of the classifier towards new classes goes (the bias terms are left as
they are, as in PyCIL's ``weight_align``). Weight clipping (Sec. 3.3) keeps the weights non-negative
after every step, as the ReLU features they multiply are.
"""

from __future__ import annotations

import torch


@torch.no_grad()
def align_weights(weight: torch.Tensor, n_old: int) -> float:
    """Scale rows ``n_old:`` of ``weight`` in place by ``gamma`` (eq. 6); returns ``gamma``
    (1 when there are no old or no new rows)."""
    if n_old == 0 or n_old >= len(weight):
        return 1.0
    norms = weight.norm(dim=1)
    gamma = norms[:n_old].mean() / norms[n_old:].mean()
    weight[n_old:] *= gamma
    return float(gamma)


@torch.no_grad()
def clip_weights(weight: torch.Tensor) -> None:
    """Weight clipping (Sec. 3.3): negative weights become 0."""
    weight.clamp_(min=0)
