"""HiDe-Prompt's class statistics: a few diagonal Gaussians per class, and task-adaptive prediction from them.

Wang, Xie, Zhang, Huang, Su & Zhu, "Hierarchical Decomposition of Prompt-Based Continual
Learning: Rethinking Obscured Sub-optimality", NeurIPS 2023 (https://arxiv.org/abs/2310.07234),
Sec. 4. After each task, the representations of each new class are summarised as the official
code's default ``ca_storage_efficient_method: multi-centroid`` does (thu-ml/HiDe-Prompt,
``engines/hide_promtp_wtp_and_tap_engine.py`` ``_compute_mean``): k-means with ``K`` clusters
(scikit-learn's ``KMeans``, k-means++), and per cluster its mean ``mu_ck`` and per-dimension
variance ``sigma_ck^2`` (``np.var``, ddof 0). The stored means are also the contrastive
regulariser's anchors (:func:`contrastive_regularisation`).

**Task-adaptive prediction (TAP)** re-trains an output layer on features replayed from these
statistics (``train_task_adaptive_prediction``): each epoch draws ``n`` features from
``N(mu_ck, diag(sigma_ck^2) + ridge I)`` for every cluster of every class seen (clusters whose
variances average exactly 0 are skipped, as the official code does), shuffles them, and takes as
many mini-batches of ``n`` as the earlier tasks have classes; SGD with momentum and cosine
annealing (:func:`~clpeft.components.heads.alignment.train_on_samples`, the loop SLCA's classifier
alignment uses). The draws are ``mu + sqrt(sigma^2 + ridge) * z`` in float32, which is what the
official ``MultivariateNormal`` forms from a diagonal covariance.

k-means draws from a ``numpy.random.RandomState`` handed in (the official code uses numpy's
global one); classes are clustered in the order given, one after the other, from that one state.
A class with fewer than ``K`` samples gets one cluster per sample (the official code fails).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from clpeft.components.heads.alignment import train_on_samples


class CentroidStatistics(nn.Module):
    """Per class: ``K`` k-means centroids of its features and the variance of each cluster.

    Args:
        dim: feature dimension ``D``.
        n_centroids: ``K``, clusters per class (the official ``n_centroids``, 10).
        ridge: added to every variance before sampling (the official ``1e-4``).

    Buffers (float64 statistics, resized on load): ``means`` and ``variances`` ``(C, K, D)``,
    ``present`` ``(C, K)`` (a cluster exists), ``order`` (class ids in the order they were added)
    and ``task_of_class`` ``(C,)`` (-1: not seen).
    """

    def __init__(self, dim: int, n_centroids: int = 10, ridge: float = 1e-4):
        super().__init__()
        self.dim, self.n_centroids, self.ridge = dim, n_centroids, ridge
        self.register_buffer("means", torch.zeros(0, n_centroids, dim, dtype=torch.float64))
        self.register_buffer("variances", torch.zeros(0, n_centroids, dim, dtype=torch.float64))
        self.register_buffer("present", torch.zeros(0, n_centroids, dtype=torch.bool))
        self.register_buffer("order", torch.zeros(0, dtype=torch.long))
        self.register_buffer("task_of_class", torch.zeros(0, dtype=torch.long))

    @property
    def n_classes(self) -> int:
        """Classes with statistics."""
        return len(self.order)

    def _grow_to(self, n_classes: int) -> None:
        extra = n_classes - self.means.shape[0]
        if extra > 0:
            self.means = torch.cat([self.means, self.means.new_zeros(extra, self.n_centroids, self.dim)])
            self.variances = torch.cat([self.variances, self.variances.new_zeros(extra, self.n_centroids, self.dim)])
            self.present = torch.cat([self.present, self.present.new_zeros(extra, self.n_centroids)])
            self.task_of_class = torch.cat([self.task_of_class, self.task_of_class.new_full((extra,), -1)])

    @torch.no_grad()
    def add(self, features: torch.Tensor, labels: torch.Tensor, classes: Sequence[int], task: int, rng: np.random.RandomState) -> None:
        """Cluster the ``(N, D)`` ``features`` of each of ``classes`` (in that order) and store them as task ``task``'s."""
        from sklearn.cluster import KMeans

        self._grow_to(max(classes) + 1)
        for c in classes:
            rows = features[labels == c].detach().float().cpu().numpy()
            k = min(self.n_centroids, len(rows))
            assignment = KMeans(n_clusters=k, random_state=rng).fit(rows).labels_
            for j in range(k):
                cluster = rows[assignment == j]
                self.means[c, j] = torch.from_numpy(np.mean(cluster, axis=0).astype(np.float64))
                self.variances[c, j] = torch.from_numpy(np.var(cluster, axis=0).astype(np.float64))
            self.present[c, :k] = True
            self.task_of_class[c] = task
            self.order = torch.cat([self.order, self.order.new_tensor([c])])

    def centroids(self) -> torch.Tensor:
        """Every stored centroid, class by class in the order added, ``(classes x K, D)`` float64."""
        return self.means[self.order][self.present[self.order]]

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``n`` float32 features from every cluster of every class (class by class, in the order added) and their labels."""
        features, labels = [], []
        for c in self.order.tolist():
            for j in range(self.n_centroids):
                variance = self.variances[c, j]
                if not self.present[c, j] or variance.mean() == 0:
                    continue
                z = torch.randn(n, self.dim, generator=generator, device=variance.device)
                features.append(self.means[c, j].float() + (variance + self.ridge).float().sqrt() * z)
                labels.append(torch.full((n,), c, dtype=torch.long, device=variance.device))
        return torch.cat(features), torch.cat(labels)

    def adapt(
        self,
        head: nn.Module,
        n: int,
        epochs: int,
        lr: float,
        weight_decay: float = 0.0,
        generator: torch.Generator | None = None,
    ) -> list[float]:
        """Task-adaptive prediction: re-train ``head`` (in place) on ``n`` draws per cluster per epoch, as many
        batches of ``n`` as the earlier tasks have classes; returns each epoch's mean loss."""
        steps = int((self.task_of_class[self.order] < self.task_of_class.max()).sum())
        draw = lambda: self.sample(n, generator)  # noqa: E731
        return train_on_samples(head, draw, epochs, n, lr=lr, momentum=0.9, weight_decay=weight_decay, generator=generator, steps=steps)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        stored = state_dict.get(prefix + "means")
        if stored is not None:
            self._grow_to(stored.shape[0])
            self.order = torch.zeros_like(state_dict[prefix + "order"], device=self.order.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, n_centroids={self.n_centroids}, n_classes={self.n_classes}"


def contrastive_regularisation(features: torch.Tensor, anchors: torch.Tensor, temperature: float = 0.8) -> torch.Tensor:
    """HiDe-Prompt's contrastive regularisation of the instructed representations (the official ``orth_loss``).

    With ``M = [anchors; features]`` (the stored centroids of earlier tasks' classes, then the
    batch), the cross-entropy of ``M M^T / temperature`` with every row's target itself: each
    feature is pushed away from the other features of the batch and from every earlier class's
    centroids. Computed in the anchors' dtype (float64 statistics), as the official
    ``torch.cat`` promotes it.
    """
    rows = torch.cat([anchors.to(features.device), features.to(anchors.dtype)]) if len(anchors) else features
    similarity = rows @ rows.T / temperature
    return F.cross_entropy(similarity, torch.arange(len(rows), device=rows.device))
