"""Virtual outlier regularisation of a classifier: synthesised outliers and an energy margin.

Huang, Chen & Hsu, "OVOR: OnePrompt with Virtual Outlier Regularization for Rehearsal-Free
Class-Incremental Learning", ICLR 2024 (https://openreview.net/forum?id=FbuyDzZTPt), Sec. 3.2,
after NPOS (Tao et al., ICLR 2023). A task's classes are trained alone, so their decision regions
spread over the feature space where later tasks' classes will lie. VOR tightens them: outliers are
synthesised around the task's features and the head is trained to give them high energy and the
task's own features low energy (eq. 4-5)::

    E(x) = -logsumexp_c f_c(x)       over the current task's classes c
    L_VOR = lambda * (H(max(0, E(x_id) - tau_id)) + H(max(0, tau_ood - E(v))))

``H`` the Huber loss against 0 (mean over the batch, ``delta = 1``), ``v`` a virtual outlier.

Synthesis (the official ``NPOS._generate``, jpmorganchase/ovor ``learners/ood.py``): features are
L2-normalised; the ``select`` features with the largest distance to their ``k``-th nearest
neighbour are the boundary points; ``sample_from`` Gaussian offsets ``sigma * N(0, I)`` are drawn,
the same offsets for every boundary point; of the candidates, the ``per_class * C`` with the
largest ``k``-th-neighbour distance to the normalised features are kept, farthest first. Distances
are squared Euclidean, as faiss's ``IndexFlatL2`` gives them; a point counts as its own nearest
neighbour. ``around="origin"`` is the official code: it computes the boundary points but never
adds them, so the candidates are the offsets themselves around the origin (each repeated
``select`` times); ``around="boundary"`` adds them (the paper's and NPOS's description).
Neighbour counts above the number of features use every feature (faiss pads the search with
infinite distances there, which makes its choice arbitrary).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

Around = Literal["origin", "boundary"]


def kth_neighbour_distance(points: torch.Tensor, bank: torch.Tensor, k: int) -> torch.Tensor:
    """Squared Euclidean distance of each row of ``points`` to its ``k``-th nearest row of ``bank``."""
    k = min(k, len(bank))
    distance = torch.cdist(points.double(), bank.double()).square()
    return distance.kthvalue(k, dim=1).values


def synthesize_outliers(
    features: torch.Tensor,
    offsets: torch.Tensor,
    n_outliers: int,
    k: int,
    select: int,
    scale: float,
    around: Around = "origin",
) -> torch.Tensor:
    """Virtual outliers ``(min(n_outliers, select * len(offsets)), D)`` of ``features`` ``(N, D)``, farthest first.

    Args:
        features: the task's features.
        offsets: ``(S, D)`` standard Gaussian draws (the official ``sample_from`` of them).
        n_outliers: how many to keep (the official ``num_per_class`` times the task's classes).
        k: the neighbour whose distance ranks points (the official ``K``).
        select: boundary points (the official ``select``).
        scale: ``sigma``, the factor on the offsets (the official ``cov``).
        around: ``"origin"`` (the official code) or ``"boundary"`` (the paper): see the module docstring.
    """
    normed = F.normalize(features, dim=1)
    select = min(select, len(normed))
    scaled = scale * offsets.to(features.device)
    if around == "origin":  # every candidate is repeated ``select`` times: rank the distinct ones
        order = kth_neighbour_distance(scaled, normed, k).argsort(descending=True, stable=True)
        candidates = scaled[order].repeat_interleave(select, dim=0)
        return candidates[: min(n_outliers, len(candidates))]
    boundary = kth_neighbour_distance(normed, normed, k).topk(select).indices
    candidates = features[boundary].repeat_interleave(len(scaled), dim=0) + scaled.repeat(select, 1)
    keep = min(n_outliers, len(candidates))
    return candidates[kth_neighbour_distance(candidates, normed, k).topk(keep).indices]


def energy_margin_loss(
    id_logits: torch.Tensor,
    outlier_logits: torch.Tensor,
    id_threshold: float,
    outlier_threshold: float,
    huber: bool = True,
) -> torch.Tensor:
    """``H(max(0, E(x) - tau_id)) + H(max(0, tau_ood - E(v)))``, ``E = -logsumexp`` (MSE for ``H`` when not ``huber``)."""
    penalty = F.huber_loss if huber else F.mse_loss
    id_gap = F.relu(-torch.logsumexp(id_logits, dim=1) - id_threshold)
    outlier_gap = F.relu(outlier_threshold + torch.logsumexp(outlier_logits, dim=1))
    return penalty(id_gap, torch.zeros_like(id_gap)) + penalty(outlier_gap, torch.zeros_like(outlier_gap))


class OutlierBatches:
    """One regularised epoch's batches: the task's features in a random order, and consecutive outlier slices.

    As the official epoch (its ``generate``): the ``N`` features (and labels) are shuffled into
    batches of the size asked for, ``ceil(N / B)`` of them, and batch ``i`` gets outliers
    ``[i b, (i + 1) b)`` with ``b = floor(n_outliers / ceil(N / B))`` (at least 1, wrapping around).

    Args:
        features: ``(N, D)`` the task's features.
        labels: ``(N,)`` their classes.
        outliers: ``(n, D)`` from :func:`synthesize_outliers`.
        order: the permutation of the features (a fresh ``torch.randperm`` when ``None``).
    """

    def __init__(self, features: torch.Tensor, labels: torch.Tensor, outliers: torch.Tensor, order: torch.Tensor | None = None):
        order = torch.randperm(len(features)) if order is None else order
        self.features, self.labels = features[order.to(features.device)], labels[order.to(labels.device)]
        self.outliers = outliers
        self._cursor = self._step = 0
        self._per_batch = 0

    def next(self, size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The next ``size`` features, their labels and this batch's outliers."""
        if not self._per_batch:  # the first batch has the full size: it fixes the number of batches
            n_batches = -(-len(self.features) // size)
            self._per_batch = max(len(self.outliers) // n_batches, 1)
        rows = slice(self._cursor, self._cursor + size)
        start = (self._step * self._per_batch) % max(len(self.outliers) - self._per_batch + 1, 1)
        self._cursor += size
        self._step += 1
        return self.features[rows], self.labels[rows], self.outliers[start : start + self._per_batch]
