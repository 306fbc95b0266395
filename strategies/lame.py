"""LAME: parameter-free online test-time adaptation of the output probabilities.

Boudiaf et al., "Parameter-free Online Test-time Adaptation", CVPR 2022
(https://arxiv.org/abs/2201.05718). The source model is never updated and keeps its source
normalisation statistics; for each test batch its probabilities ``p`` are replaced by the
Laplacian-regularised assignments ``z`` that maximise the batch likelihood under a manifold
smoothness prior (eq. 4), found by the fixed point ``z_i <- softmax(log p_i + sum_j w_ij z_j)``
(eq. 7) on an affinity ``W`` of the L2-normalised backbone features
(:mod:`clpeft.components.tta.laplacian_adjustment`). ``adapt`` returns ``log z`` as logits.

The default affinity is that of the authors' code and of Döbler et al.'s benchmark
(``LAME.AFFINITY: rbf``, ``KNN: 5``, ``FORCE_SYMMETRY: False`` in its ``conf.py``): ``rbf``,
whose bandwidth is the mean distance to the ``knn``-th nearest feature (the point itself
included); ``knn`` (a k-nearest-neighbour graph) and ``linear`` are the alternatives.
``batch_statistics: true`` is a variant outside the paper: the features come from the backbone
normalised with test-batch BatchNorm statistics (as ``bn_adapt``), for streams whose covariate
shift leaves the source statistics' features too poor for a useful affinity graph.
"""

from typing import Annotated, Literal

import torch
from pydantic import Field

from clpeft.components.tta.adapting_strategy import AdaptingStrategy
from clpeft.components.tta.laplacian_adjustment import affinity, laplacian_adjustment
from clpeft.registry import register_strategy


@register_strategy("lame")
class LAME(AdaptingStrategy):
    """LAME: Laplacian-adjusted maximum-likelihood on the outputs, no parameter update (Boudiaf et al. 2022).

    Args:
        backbone: the source feature extractor.
        affinity: ``knn``, ``rbf`` or ``linear`` affinity between test features.
        knn: neighbours ``k`` of the kNN graph (and of the rbf bandwidth).
        max_steps: maximum fixed-point iterations.
        batch_statistics: normalise with test-batch BatchNorm statistics (not in the paper).
    """

    def __init__(
        self,
        backbone,
        affinity: Literal["knn", "rbf", "linear"] = "rbf",
        knn: Annotated[int, Field(ge=1)] = 5,
        max_steps: Annotated[int, Field(ge=1)] = 100,
        batch_statistics: bool = False,
    ):
        super().__init__(backbone, None, batch_statistics)
        self.affinity_kind = affinity
        self.knn = knn
        self.max_steps = max_steps

    def adapt(self, x: torch.Tensor) -> torch.Tensor:
        self.adaptation.begin_batch(self)
        with torch.no_grad():
            features = self.embed(x)
            probs = self.head(features).float().softmax(1)
            kernel = affinity(features, self.affinity_kind, self.knn)
            return laplacian_adjustment(probs, kernel, self.max_steps).clamp_min(1e-20).log()
