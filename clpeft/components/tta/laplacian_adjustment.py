"""Laplacian-adjusted maximum-likelihood estimation of a batch's labels (LAME).

Boudiaf et al., "Parameter-free Online Test-time Adaptation", CVPR 2022
(https://arxiv.org/abs/2201.05718). The model is not updated; its output probabilities ``p``
on a test batch are corrected by solving, over assignments ``z_i`` in the simplex,

    min_z  sum_i KL(z_i || p_i) - sum_{i,j} w_ij z_i^T z_j              (eq. 4)

with the concave-convex procedure, whose bound optimiser is the fixed-point iteration (eq. 7)

    z_i <- softmax( log p_i + sum_j w_ij z_j ),   z^(0) = p,

stopped when the bound energy ``sum_i z_i^T (-log p_i) - z_i^T (W z)_i + z_i^T log z_i``
changes by at most ``1e-8`` of its value, or after ``max_steps`` (100) iterations, as in the
authors' code. The affinity ``W`` is computed on L2-normalised features: ``knn`` (1 for each of
the ``k`` nearest neighbours, self excluded), ``rbf`` (``exp(-d^2 / 2 sigma^2)``, ``sigma`` the mean
distance to the ``k``-th neighbour) or ``linear`` (``f_i^T f_j``).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F


def affinity(features: torch.Tensor, kind: Literal["knn", "rbf", "linear"] = "knn", knn: int = 5) -> torch.Tensor:
    """``(N, N)`` affinity matrix of L2-normalised ``features``."""
    x = F.normalize(features.float(), dim=1)
    if kind == "linear":
        return x @ x.T
    n = x.shape[0]
    dist = torch.cdist(x, x, compute_mode="donot_use_mm_for_euclid_dist")  # exact: self-distance 0
    if kind == "knn":
        k = min(knn + 1, n)
        neighbours = dist.topk(k, dim=1, largest=False).indices[:, 1:]
        return torch.zeros(n, n, device=x.device).scatter_(1, neighbours, 1.0)
    kth = dist.topk(min(knn, n), dim=1, largest=False).values[:, -1]
    sigma = kth.mean()
    return torch.exp(-(dist**2) / (2 * sigma**2))


def laplacian_adjustment(probs: torch.Tensor, kernel: torch.Tensor, max_steps: int = 100, tol: float = 1e-8) -> torch.Tensor:
    """LAME's corrected assignments ``z`` (rows in the simplex) for probabilities ``probs``."""
    unary = -torch.log(probs + 1e-10)
    z = (-unary).softmax(1)
    previous = float("inf")
    for step in range(max_steps):
        pairwise = kernel @ z
        z = (-unary + pairwise).softmax(1)
        energy = float((unary * z - pairwise * z + z * torch.log(z.clamp_min(1e-20))).sum())
        if step > 1 and abs(energy - previous) <= tol * abs(previous):
            break
        previous = energy
    return z
