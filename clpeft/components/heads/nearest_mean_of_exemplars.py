"""iCaRL's nearest-mean-of-exemplars classifier.

Rebuffi et al., "iCaRL: Incremental Classifier and Representation Learning", CVPR 2017
(https://arxiv.org/abs/1611.07725), Alg. 1: ``y* = argmin_y || phi(x) - mu_y ||`` with
``mu_y = 1/|P_y| sum_{p in P_y} phi(p)`` the mean of class ``y``'s exemplars, all features
L2-normalised (Sec. 2.1, "Architecture"). As LAMDA-PILOT (PyCIL ``models/base.py``:
``_construct_exemplar`` / ``_eval_nme``) and Mammoth (``models/icarl.py``) compute it: features are
divided by ``||phi|| + 1e-8``, the class mean is renormalised to unit length, and the logits are the
negative squared distances (PILOT's ``cdist(..., "sqeuclidean")``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import nn

from clpeft.components.heads.classifiers import PrototypeHead
from clpeft.components.memory.replay import NORM_EPSILON
from clpeft.data import Batch


def unit_rows(x: torch.Tensor) -> torch.Tensor:
    """``x / (||x|| + 1e-8)`` row by row (PILOT's normalisation of features)."""
    return x / (x.norm(dim=1, keepdim=True) + NORM_EPSILON)


@torch.no_grad()
def labelled_features(
    batches: Iterable[Batch], embed: Callable[[torch.Tensor], torch.Tensor], dim: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 CPU features (``embed(batch.x)``) and labels of every batch, in order: what herding and
    the exemplar means are computed on (a strategy passes ``self.batches(view)`` and ``self.embed``)."""
    pairs = [(embed(b.x).float().cpu(), b.y.cpu()) for b in batches]
    if not pairs:
        return torch.empty(0, dim), torch.empty(0, dtype=torch.long)
    return torch.cat([f for f, _ in pairs]), torch.cat([y for _, y in pairs])


class NearestMeanOfExemplars(PrototypeHead):
    """``logit_y = -|| phi(x)/||phi(x)|| - mu_y ||^2``, ``mu_y`` the unit-length mean of class ``y``'s
    normalised exemplar features (float64 buffers, as every closed-form head).

    Args:
        in_features: feature dimension.
        n_classes: initial number of classes.
    """

    def __init__(self, in_features: int, n_classes: int = 0):
        super().__init__(in_features, n_classes, metric="euclidean")

    @torch.no_grad()
    def fit(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        """Set the mean of every class present in ``labels`` from its exemplars' ``features``."""
        x = unit_rows(features.to(torch.float64))
        classes = torch.unique(labels)
        means = torch.stack([x[labels == c].mean(0) for c in classes.tolist()]) if len(classes) else x[:0]
        self.set_prototypes(nn.functional.normalize(means, dim=1, eps=0.0), classes)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return super().logits(unit_rows(x))
