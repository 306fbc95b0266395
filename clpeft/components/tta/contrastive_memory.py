"""AdaContrast's memories: the MoCo key queue with pseudo-labels and the feature bank of the nearest-neighbour refinement.

Chen et al., "Contrastive Test-Time Adaptation", CVPR 2022 (https://arxiv.org/abs/2204.10377),
section 3, as in the code of Döbler et al.'s benchmark (``classification/methods/adacontrast.py``):

* the key queue (MoCo, He et al. 2020): ``K`` L2-normalised key features and their pseudo-labels,
  a ring buffer started from random unit vectors and random labels; the instance logits of a
  query ``q`` are ``[q . k, q . queue] / tau`` with its own key ``k`` as the positive (eq. 4);
  class-aware: queue entries with the query's pseudo-label are left out of the negatives
  (``-inf``), and the loss is the cross-entropy with the positive;
* the bank (eq. 1-2): the momentum model's features and probabilities of the last ``K`` weak
  views; a pseudo-label is refined as the argmax of the mean probability of the ``k`` nearest bank
  features (cosine or Euclidean distance). As in the code the refinement starts once 1,024
  samples have been labelled by their own argmax.

The queue is part of the ``state_dict`` (buffers); the bank, whose length grows up to ``K``, is
extra state.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

WARM_SAMPLES = 1024  # samples labelled by their own prediction before the refinement starts (the code's constant)
CHUNK = 64  # test features per distance computation (the code's)


class ContrastiveMemory(nn.Module):
    """The key queue and the feature bank of AdaContrast (see the module docstring).

    Args:
        feature_dim: width of the features.
        queue_size: ``K``, entries of the queue and of the bank.
        num_neighbors: ``k`` of the refinement.
        distance: ``cosine`` or ``euclidean`` distance of the refinement.
    """

    def __init__(
        self, feature_dim: int, queue_size: int = 16384, num_neighbors: int = 10, distance: Literal["cosine", "euclidean"] = "cosine"
    ):
        super().__init__()
        self.queue_size, self.num_neighbors, self.distance = queue_size, num_neighbors, distance
        self.register_buffer("keys", torch.zeros(feature_dim, queue_size))
        self.register_buffer("key_labels", torch.zeros(queue_size, dtype=torch.long))
        self.register_buffer("key_position", torch.zeros((), dtype=torch.long))
        self.register_buffer("labelled", torch.zeros((), dtype=torch.long))
        self.bank: dict[str, torch.Tensor | int] = {}
        self._empty_bank()

    def _empty_bank(self) -> None:
        self.bank = {"features": self.keys.new_zeros(0, self.keys.shape[0]), "probs": self.keys.new_zeros(0, 0), "position": 0}

    def start(self, n_classes: int) -> None:
        """Random unit keys and random labels in the queue (drawn in that order), an empty bank."""
        self.keys.copy_(F.normalize(torch.randn(self.keys.shape, device=self.keys.device), dim=0))
        self.key_labels.copy_(torch.randint(0, n_classes, (self.queue_size,), device=self.keys.device))
        self.key_position.zero_()
        self.labelled.zero_()
        self._empty_bank()

    def instance_logits(self, q: torch.Tensor, k: torch.Tensor, temperature: float) -> torch.Tensor:
        """``[q . k, q . queue] / tau`` for unit queries ``q`` and keys ``k``, ``(B, 1 + K)``."""
        positive = (q * k).sum(1, keepdim=True)
        return torch.cat([positive, q @ self.keys.clone().detach()], dim=1) / temperature

    def instance_loss(self, logits: torch.Tensor, pseudo_labels: torch.Tensor, class_aware: bool = True) -> torch.Tensor:
        """Cross-entropy with the positive (column 0); class-aware: same-label queue entries masked out."""
        if class_aware:
            same = pseudo_labels.view(-1, 1) == self.key_labels
            logits = logits.masked_fill(torch.cat([torch.zeros_like(same[:, :1]), same], dim=1), float("-inf"))
        return F.cross_entropy(logits, torch.zeros(len(logits), dtype=torch.long, device=logits.device))

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor, labels: torch.Tensor) -> None:
        """Write ``keys`` (``(B, D)``, unit) and their pseudo-labels at the ring position."""
        idx = (int(self.key_position) + torch.arange(len(keys), device=keys.device)) % self.queue_size
        self.keys[:, idx] = keys.T.to(self.keys.dtype)
        self.key_labels[idx] = labels
        self.key_position.fill_((int(self.key_position) + len(keys)) % self.queue_size)

    @torch.no_grad()
    def pseudo_labels(self, features: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        """The argmax of ``probs`` for the first 1,024 samples, then the nearest-neighbour refinement."""
        if int(self.labelled) < WARM_SAMPLES:
            self.labelled += len(features)
            return probs.argmax(1)
        refined = []
        for chunk in features.split(CHUNK):
            if self.distance == "euclidean":
                distances = torch.cdist(chunk, self.bank["features"])
            else:
                distances = 1 - F.normalize(chunk, dim=1) @ F.normalize(self.bank["features"], dim=1).T
            nearest = distances.sort().indices[:, : self.num_neighbors]
            refined.append(self.bank["probs"][nearest].mean(1))
        return torch.cat(refined).argmax(1)

    @torch.no_grad()
    def update_bank(self, features: torch.Tensor, logits: torch.Tensor) -> None:
        """Append (or, once full, overwrite at the ring position) features and probabilities."""
        probs = logits.softmax(1)
        bank = self.bank
        start, end = bank["position"], bank["position"] + len(features)
        if len(bank["features"]) < self.queue_size:
            bank["features"] = torch.cat([bank["features"], features])
            bank["probs"] = torch.cat([bank["probs"].view(-1, probs.shape[1]), probs])
        else:
            idx = torch.arange(start, end, device=features.device) % len(bank["features"])
            bank["features"][idx], bank["probs"][idx] = features, probs
        bank["position"] = end % len(bank["features"])

    def get_extra_state(self) -> dict:
        return {k: v.clone() if torch.is_tensor(v) else v for k, v in self.bank.items()}

    def set_extra_state(self, state: dict) -> None:
        self.bank = {k: v.clone() if torch.is_tensor(v) else v for k, v in state.items()}

    def _apply(self, fn, *args, **kwargs):
        self.bank = {k: fn(v) if torch.is_tensor(v) else v for k, v in self.bank.items()}
        return super()._apply(fn, *args, **kwargs)
