"""RanPAC: random projections and decorrelated class prototypes on frozen features.

McDonnell, Gong, Parvaneh, Abbasnejad & van den Hengel, "RanPAC: Random Projections and
Pre-trained Models for Continual Learning", NeurIPS 2023 (https://arxiv.org/abs/2307.02251;
code: RanPAC/RanPAC ``RanPAC.py`` and LAMDA-PILOT ``models/ranpac.py``).

1. phase 1 (``adapt``): on the first experience, train a parameter-efficient module with a
   cosine head, then freeze it: ``adapter`` = AdaptFormer adapters in every block (bottleneck
   64, scale 0.1), the paper's and PILOT's headline method; or the last blocks / the whole
   backbone (see
   :class:`~clpeft.components.heads.frozen_feature_classifier.FrozenFeatureClassifier`);
   ``none`` is the paper's no-phase-1 ablation ("ncm" rows of the authors' argument files);
2. project every frozen feature ``f`` (dimension ``L``) to ``h = phi(f^T W)`` with a fixed
   Gaussian ``W`` (``L x M``, entries N(0, 1)) and ``phi`` = ReLU (eq. 5);
3. accumulate ``G = sum h h^T`` and ``C = sum h y^T`` over every experience (one-hot ``y``)
   and predict ``s_y = h^T (G + lambda I)^-1 c_y`` (eq. 4, the decorrelated prototypes);
   ``head: cosine`` predicts ``cos(h, (G + lambda I)^-1 c_y)`` instead, as PILOT's code does;
4. ``lambda`` is chosen after each experience from ``10^-8 .. 10^8`` (both official codes'
   ``10.0 ** np.arange(-8, 9)``) by the ridge solution's mean squared error on the last 20% of
   that experience's training data in a random order, fitted on the first 80% (the authors'
   ``optimise_ridge_parameter`` on its shuffled loader); the head then uses all data.

Checked against PILOT's code in ``tests/reference/test_pilot.py`` (adapter steps, ``G``,
``C``, lambda, the head's weights and logits). Differences: the statistics are float64 (PILOT:
float32); phase 1's cosine learning-rate schedule is stepped per optimizer step here, per
epoch in the official code (``train.schedule: cosine``).

Paper symbols: ``M`` -> ``projection_dim`` (0: no projection, decorrelation only), ``lambda``
-> ``ridge_candidates`` (the chosen one is the ``ridge`` buffer).
"""

from __future__ import annotations

from typing import Annotated, Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field

from clpeft.components.heads.class_statistics import ClassStatistics
from clpeft.components.heads.classifiers import CosineHead, RidgeHead, ridge_by_holdout
from clpeft.components.heads.frozen_feature_classifier import AdaptPart, FrozenFeatureClassifier
from clpeft.experience import Experience
from clpeft.registry import register_strategy

PAPER_RIDGES = (10.0 ** np.arange(-8, 9)).tolist()  # the official list, bit for bit (10^-5 is 9.999999999999999e-06)


@register_strategy("ranpac")
class RanPAC(FrozenFeatureClassifier):
    """RanPAC: random ReLU projection + ridge-regression (decorrelated) class prototypes (McDonnell et al. 2023).

    Args:
        backbone: the feature extractor (frozen by the strategy after optional adaptation).
        projection_dim: ``M``, width of the random projection; 0 uses the features directly.
        ridge_candidates: the candidate ``lambda`` values.
        holdout: fraction of each experience's training data held out to choose ``lambda``.
        head: ``linear`` logits ``h^T w_c`` (eq. 4, the authors' code) or ``cosine``
            ``cos(h, w_c)`` (LAMDA-PILOT's code).
        adapt: phase 1 on the first experience: ``adapter`` (the paper's AdaptFormer), ``none``
            (the "ncm" ablation), ``full`` or ``last_blocks`` of the backbone; trained with a cosine head.
        adapt_blocks: blocks fine-tuned by ``last_blocks``.
        adapter_bottleneck: the adapters' hidden width (``ffn_num``).
    """

    def __init__(
        self,
        backbone,
        projection_dim: Annotated[int, Field(ge=0)] = 10000,
        ridge_candidates: Annotated[list[Annotated[float, Field(gt=0)]], Field(min_length=1)] = PAPER_RIDGES,
        holdout: Annotated[float, Field(gt=0, lt=1)] = 0.2,
        head: Literal["linear", "cosine"] = "linear",
        adapt: AdaptPart = "none",
        adapt_blocks: Annotated[int, Field(ge=1)] = 1,
        adapter_bottleneck: Annotated[int, Field(ge=1)] = 64,
    ):
        dim = projection_dim or backbone.feature_dim
        super().__init__(
            backbone,
            RidgeHead(dim, metric=head),
            ClassStatistics(dim, covariance="shared"),
            adapt,
            adapt_blocks,
            adapt_head=CosineHead(backbone.feature_dim) if adapt != "none" else None,
            adapter_bottleneck=adapter_bottleneck,
        )
        self.ridge_candidates = list(ridge_candidates)
        self.holdout = holdout
        projection = torch.randn(backbone.feature_dim, projection_dim) if projection_dim else torch.empty(0)
        self.register_buffer("projection", projection)
        self.register_buffer("ridge", torch.tensor(float("nan"), dtype=torch.float64))

    def transform(self, features: torch.Tensor) -> torch.Tensor:
        """``h = ReLU(f^T W)`` in float32 (autocast off, so evaluation matches the statistics)."""
        if self.projection.numel() == 0:
            return features.float()
        with torch.autocast(features.device.type, enabled=False):
            return F.relu(features.float() @ self.projection)

    @torch.no_grad()
    def absorb(self, exp: Experience) -> None:
        """Accumulate ``G`` and ``C``; choose ``lambda`` on this experience's samples in a random
        order: fitted on the first ``1 - holdout``, scored on the rest."""
        n = len(exp.train)
        held_out = torch.zeros(n, dtype=torch.bool)
        held_out[torch.randperm(n)[int(n * (1 - self.holdout)) :]] = True
        fit, held = (ClassStatistics(self.stats.dim, exp.n_classes_seen).to(self.stats.mean.device) for _ in range(2))
        start = 0
        for batch in self.batches(exp.train):
            h = self.transform(self.embed(batch.x))
            out = held_out[start : start + len(h)].to(h.device)
            start += len(h)
            fit.update(h[~out], batch.y[~out])
            held.update(h[out], batch.y[out])
        self.ridge.fill_(
            ridge_by_holdout(fit.gram(), fit.class_sums(), held.gram(), held.class_sums(), float(held.counts.sum()), self.ridge_candidates)[
                0
            ]
        )
        self.stats.merge(fit)
        self.stats.merge(held)
        self.stats.grow_to(exp.n_classes_seen)

    def fit_head(self) -> None:
        self.head.fit(self.stats.gram(), self.stats.class_sums(), float(self.ridge))
