"""EASE's classifier over task subspaces: prototypes per (class, subspace), the complement of old classes' missing ones, the reweighted cosine logits.

Zhou, Sun, Ye & Zhan, "Expandable Subspace Ensemble for Pre-Trained Model-Based Class-Incremental
Learning", CVPR 2024 (https://arxiv.org/abs/2403.12030; code: LAMDA-PILOT ``models/ease.py`` and
``backbone/linears.py`` ``EaseCosineLinear.forward_reweight``). Task ``j`` trains adapter ``j``,
which spans subspace ``j`` of the concatenated feature. ``P[c, j]`` is class ``c``'s prototype
(its mean feature) in subspace ``j``; a class of task ``i`` has real prototypes in subspaces
``0..i`` (computed at task ``i``, after which its data is gone) and *complemented* ones in
the later subspaces (Sec. 4.2, eq. 7-8).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


@torch.no_grad()
def complement_prototypes(prototypes: torch.Tensor, task_of_class: torch.Tensor, n_tasks: int, recompute: bool = True) -> None:
    """Fill old classes' prototypes in the subspaces of later tasks, in place (EASE eq. 7-8).

    For an old task ``i`` and a later subspace ``j``: the classes of tasks ``>= j`` have real
    prototypes in both subspaces; each class of task ``i`` is given in subspace ``j`` the
    combination of theirs weighted by ``softmax_k cos(P[c, i], P[k, i])`` (the similarity
    measured in the old class's own subspace ``i``): ``P[c, j] = sum_k softmax(...)_k P[k, j]``.

    Args:
        prototypes: ``(C, n, D)``; rows of classes of tasks ``0..n-1``, real where described above.
        task_of_class: ``(C,)`` task index of every class.
        n_tasks: ``n``, the subspaces filled (the current task is ``n - 1``).
        recompute: every pair ``i < j`` again, with the classes added since (PILOT's
            ``recalc_sim: true``, its published setting); ``False``: only the new subspace ``n - 1``.
    """
    last = n_tasks - 1
    for i in range(last):
        own = task_of_class == i
        anchor = F.normalize(prototypes[own, i], dim=-1)
        for j in range(i + 1, n_tasks) if recompute else (last,):
            known = task_of_class >= j
            similarity = torch.softmax(anchor @ F.normalize(prototypes[known, i], dim=-1).T, dim=1)
            prototypes[own, j] = similarity @ prototypes[known, j]


def subspace_ensemble_logits(features: torch.Tensor, prototypes: torch.Tensor, task_of_class: torch.Tensor, alpha: float) -> torch.Tensor:
    """``logit_c = cos(f_i, P[c, i]) + alpha / (n - 1) sum_{j != i} cos(f_j, P[c, j])`` for a class of task ``i``.

    The ensemble of subspaces of eq. 9, as PILOT's ``forward_reweight`` (whose divisor is the
    current task index ``n - 1``). ``features`` ``(B, n, D)``, ``prototypes`` ``(C, n, D)``.
    Classes of tasks ``>= n`` (no prototypes yet) score 0.
    """
    n = features.shape[1]
    cos = torch.einsum("bjd,cjd->bcj", F.normalize(features, dim=-1), F.normalize(prototypes, dim=-1))
    weights = torch.full((len(prototypes), n), alpha / max(n - 1, 1), dtype=cos.dtype, device=cos.device)
    own = task_of_class < n
    weights[own.nonzero().flatten(), task_of_class[own]] = 1.0
    return (cos * weights).sum(-1)
