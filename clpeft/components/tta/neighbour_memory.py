"""AdaNPC's memory of labelled features and its k-nearest-neighbour vote.

Zhang et al., "AdaNPC: Exploring Non-Parametric Classifier for Test-Time Adaptation", ICML 2023
(https://arxiv.org/abs/2304.12566). The memory holds L2-normalised features ``m_i`` with labels
``y_i`` (the source training data first, then confident test samples with their predicted
labels). A feature ``z`` is classified by its ``k`` most cosine-similar entries ``N_k(z)``:

    p_c(z) = sum_{i in N_k(z)} w_i [y_i = c],    w_i = exp(s_i / tau) / sum_{j in N_k(z)} exp(s_j / tau),

``s_i = <z / |z|, m_i>`` and ``tau`` the temperature (``MomentumQueue.forward`` of the authors'
``domainbed/knn.py``). The authors' memory grows without bound; ``capacity`` bounds it first in,
first out: the oldest entries (the source features before any test sample) leave first.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class NeighbourMemory(nn.Module):
    """A memory of normalised features and labels voting by weighted k nearest neighbours; saved in the ``state_dict``.

    Args:
        k: neighbours ``k`` of the vote (all entries when the memory holds fewer).
        temperature: ``tau`` of the neighbours' softmax weights.
        capacity: most entries kept (the oldest leave first); ``None``: unbounded.
    """

    def __init__(self, k: int = 10, temperature: float = 0.1, capacity: int | None = None):
        super().__init__()
        self.k = k
        self.temperature = temperature
        self.capacity = capacity
        self.register_buffer("features", torch.zeros(0, 0))
        self.register_buffer("labels", torch.zeros(0, dtype=torch.long))

    def __len__(self) -> int:
        return len(self.labels)

    def clear(self) -> None:
        """Forget every entry."""
        self.features = self.features.new_zeros(0, 0)
        self.labels = self.labels.new_zeros(0)

    def add(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        """Append ``features`` (normalised here) with ``labels``; drop the oldest entries past ``capacity``."""
        z = F.normalize(features.detach().float(), dim=1)
        stored = self.features if len(self) else self.features.new_zeros(0, z.shape[1])
        self.features = torch.cat([stored, z.to(stored.device)])
        self.labels = torch.cat([self.labels, labels.detach().to(self.labels)])
        if self.capacity is not None and len(self) > self.capacity:
            self.features = self.features[-self.capacity :]
            self.labels = self.labels[-self.capacity :]

    def vote(self, features: torch.Tensor, n_classes: int) -> torch.Tensor:
        """Class probabilities ``p_c(z)`` of each row of ``features`` (``B x n_classes``)."""
        if not len(self):
            raise RuntimeError("NeighbourMemory.vote on an empty memory")
        similarity = F.normalize(features.float(), dim=1) @ self.features.T
        top, index = similarity.topk(min(self.k, len(self)), dim=1)
        weights = (top / self.temperature).softmax(1)
        return weights.new_zeros(len(features), n_classes).scatter_add_(1, self.labels[index], weights)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for name in ("features", "labels"):  # the saved memory's size, not this one's
            if prefix + name in state_dict:
                setattr(self, name, torch.empty_like(state_dict[prefix + name], device=getattr(self, name).device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
