"""Streaming per-class feature statistics: counts, means and (co)variances.

Features arrive batch by batch; each batch's per-class count ``n_b``, mean ``m_b`` and scatter
``S_b = sum (x - m_b)(x - m_b)^T`` are merged into the running ones with the pairwise update of
Chan, Golub & LeVeque (1979) ("Updating formulae and a pairwise algorithm for computing sample
variances"):

    n = n_a + n_b,   delta = m_b - m_a,   m = m_a + delta * n_b / n,
    S = S_a + S_b + delta delta^T * n_a n_b / n.

Accumulators are float64, so the result does not depend on how the data was split into batches
(up to float64 rounding). Used by prototype heads (NCM), LDA heads, RanPAC's Gram matrix and
SLCA's classifier alignment.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn

from clpeft.distributed import World, current

CovarianceMode = Literal["none", "shared", "per_class"]


class ClassStatistics(nn.Module):
    """Running count, mean and scatter of features per class (float64 buffers).

    Args:
        dim: feature dimension ``D``.
        n_classes: initial number of classes (grows automatically with the labels seen).
        covariance: which second moments to keep:
            ``"none"`` — counts and means only;
            ``"shared"`` — one pooled within-class scatter ``sum_c S_c`` (D x D), enough for
            :meth:`shared_covariance` and :meth:`gram` (LDA, RanPAC);
            ``"per_class"`` — one scatter per class (C x D x D), needed by :meth:`covariance`
            (SLCA, QDA-style sampling); also serves :meth:`shared_covariance` and :meth:`gram`.

    Buffers (all float64, part of ``state_dict``; loading resizes them to the stored shapes):
        ``counts`` (C,), ``mean`` (C, D), ``scatter`` (C, D, D) / (D, D) / (0,) by mode.

    Classes never seen have count 0, a zero mean and a zero scatter.

    API: :meth:`update` (a batch), :meth:`merge` (another accumulator), :meth:`gathered` (all
    ranks' accumulators of a data-parallel run), :meth:`grow_to`;
    read-outs in float64: :meth:`means`, :meth:`class_sums`, :meth:`covariance` (one class),
    :meth:`shared_covariance` (pooled within-class), :meth:`total_covariance`, :meth:`gram`,
    :meth:`within_scatter`, :meth:`seen`; ``counts`` is the (C,) buffer of sample counts.
    Buffers live on the module's device (float64 is unsupported on Apple MPS).
    """

    def __init__(self, dim: int, n_classes: int = 0, covariance: CovarianceMode = "shared"):
        super().__init__()
        if covariance not in ("none", "shared", "per_class"):
            raise ValueError(f"covariance must be 'none', 'shared' or 'per_class', not {covariance!r}")
        self.dim = dim
        self.mode = covariance
        f64 = torch.float64
        self.register_buffer("counts", torch.zeros(0, dtype=f64))
        self.register_buffer("mean", torch.zeros(0, dim, dtype=f64))
        scatter_shape = {"none": (0,), "shared": (dim, dim), "per_class": (0, dim, dim)}[covariance]
        self.register_buffer("scatter", torch.zeros(scatter_shape, dtype=f64))
        self.grow_to(n_classes)

    @property
    def n_classes(self) -> int:
        return self.counts.shape[0]

    def grow_to(self, n_classes: int) -> None:
        """Add empty classes up to ``n_classes``; a no-op when already that large."""
        extra = n_classes - self.n_classes
        if extra <= 0:
            return
        self.counts = torch.cat([self.counts, self.counts.new_zeros(extra)])
        self.mean = torch.cat([self.mean, self.mean.new_zeros(extra, self.dim)])
        if self.mode == "per_class":
            self.scatter = torch.cat([self.scatter, self.scatter.new_zeros(extra, self.dim, self.dim)])

    @torch.no_grad()
    def update(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        """Merge a batch: ``features`` (N, D), ``labels`` (N,) global class ids."""
        if features.shape[0] == 0:
            return
        x = features.detach().reshape(features.shape[0], -1).to(self.mean.device, torch.float64)
        y = labels.detach().to(self.mean.device, torch.long)
        if x.shape[1] != self.dim:
            raise ValueError(f"features have dimension {x.shape[1]}, the statistics expect {self.dim}")
        classes, slot, n_b = torch.unique(y, return_inverse=True, return_counts=True)
        n_b = n_b.to(torch.float64)
        m_b = torch.zeros(len(classes), self.dim, dtype=torch.float64, device=x.device).index_add_(0, slot, x)
        m_b /= n_b[:, None]
        centred = x - m_b[slot]
        if self.mode == "per_class":
            s_b = torch.stack([centred[slot == j].T @ centred[slot == j] for j in range(len(classes))])
        elif self.mode == "shared":
            s_b = centred.T @ centred
        else:
            s_b = None
        self._merge(classes, n_b, m_b, s_b)

    @torch.no_grad()
    def merge(self, other: ClassStatistics) -> None:
        """Fold another accumulator (same ``dim`` and mode) into this one, e.g. another data
        split or another process's statistics."""
        if other.dim != self.dim or other.mode != self.mode:
            raise ValueError(f"cannot merge {other.extra_repr()} into {self.extra_repr()}")
        classes = torch.nonzero(other.seen()).flatten().to(self.mean.device)
        if len(classes) == 0:
            return
        scatter = other.scatter.to(self.mean.device)
        s_b = scatter[classes] if self.mode == "per_class" else scatter if self.mode == "shared" else None
        self._merge(classes, other.counts.to(self.mean.device)[classes], other.mean.to(self.mean.device)[classes], s_b)

    @torch.no_grad()
    def gathered(self, world: World | None = None) -> ClassStatistics:
        """Every rank's accumulator merged in rank order (``self`` when there is one process).

        Under ``torchrun`` each rank accumulates its share of an experience into a fresh
        accumulator; this gathers the shares (float64, ``all_gather_object``) so that every rank
        holds the statistics of the whole experience. Collective: every rank must call it.
        """
        world = world or current()
        if not world.active:
            return self
        shares = world.all_gather_object({k: v.cpu() for k, v in self.state_dict().items()})
        total = ClassStatistics(self.dim, covariance=self.mode).to(self.mean.device)
        for share in shares:
            part = ClassStatistics(self.dim, covariance=self.mode)
            part.load_state_dict(share)
            total.merge(part)
        return total

    def _merge(self, classes: torch.Tensor, n_b: torch.Tensor, m_b: torch.Tensor, s_b: torch.Tensor | None) -> None:
        """Chan et al.'s pairwise update for the given classes: counts ``n_b``, means ``m_b`` and
        scatters ``s_b`` (per class, summed over classes, or None by mode)."""
        self.grow_to(int(classes.max()) + 1)
        n_a = self.counts[classes]
        n = n_a + n_b
        delta = m_b - self.mean[classes]
        weight = n_a * n_b / n
        self.mean[classes] += delta * (n_b / n)[:, None]
        self.counts[classes] = n
        if self.mode == "per_class":
            self.scatter[classes] += s_b + weight[:, None, None] * delta[:, :, None] * delta[:, None, :]
        elif self.mode == "shared":
            self.scatter += s_b + (delta.T * weight) @ delta

    # ------------------------------------------------------------------ read-outs (float64)

    def seen(self) -> torch.Tensor:
        """Boolean mask (C,) of classes with at least one sample."""
        return self.counts > 0

    def means(self) -> torch.Tensor:
        """Class means ``mu_c`` (C, D), zero rows for unseen classes (a copy)."""
        return self.mean.clone()

    def class_sums(self) -> torch.Tensor:
        """Per-class feature sums ``n_c mu_c`` (C, D): RanPAC's ``C = H^T Y``."""
        return self.mean * self.counts[:, None]

    def covariance(self, cls: int, ddof: int = 1) -> torch.Tensor:
        """Covariance of class ``cls``: ``S_c / (n_c - ddof)`` (needs ``covariance='per_class'``)."""
        self._require("per_class", "covariance(cls)")
        return self.scatter[cls] / max(float(self.counts[cls]) - ddof, 1.0)

    def within_scatter(self) -> torch.Tensor:
        """Pooled within-class scatter ``sum_c S_c`` (D, D)."""
        self._require_second_moments("within_scatter()")
        return self.scatter.sum(0) if self.mode == "per_class" else self.scatter.clone()

    def shared_covariance(self, unbiased: bool = True) -> torch.Tensor:
        """Pooled within-class covariance ``sum_c S_c / (N - K)`` (D, D).

        ``N`` is the number of samples and ``K`` the number of seen classes (the unbiased
        pooled estimate of textbook LDA); ``unbiased=False`` divides by ``N`` instead, which is
        the covariance sklearn's ``LinearDiscriminantAnalysis`` uses with its default priors.
        """
        total = float(self.counts.sum())
        denominator = total - float(self.seen().sum()) if unbiased else total
        return self.within_scatter() / max(denominator, 1.0)

    def total_covariance(self, unbiased: bool = True) -> torch.Tensor:
        """Covariance of all features around the global mean, ignoring labels (D, D):
        ``(sum_c S_c + sum_c n_c (mu_c - mu)(mu_c - mu)^T) / (N - 1)`` (``/ N`` if not
        ``unbiased``). FSA's LDA head uses this one (``torch.cov`` of every feature)."""
        total = float(self.counts.sum())
        offset = self.mean - (self.counts @ self.mean) / max(total, 1.0)
        between = (offset.T * self.counts) @ offset
        return (self.within_scatter() + between) / max(total - 1.0 if unbiased else total, 1.0)

    def gram(self) -> torch.Tensor:
        """Uncentred second moment ``sum_i x_i x_i^T = sum_c (S_c + n_c mu_c mu_c^T)`` (D, D):
        RanPAC's Gram matrix ``G = H^T H``."""
        return self.within_scatter() + (self.mean.T * self.counts) @ self.mean

    def _require_second_moments(self, what: str) -> None:
        if self.mode == "none":
            raise RuntimeError(f"{what} needs ClassStatistics(covariance='shared' or 'per_class')")

    def _require(self, mode: str, what: str) -> None:
        if self.mode != mode:
            raise RuntimeError(f"{what} needs ClassStatistics(covariance={mode!r}), this one keeps {self.mode!r}")

    # ------------------------------------------------------------------ state

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        stored = state_dict.get(prefix + "counts")
        if stored is not None:
            self.grow_to(stored.shape[0])
            if stored.shape[0] < self.n_classes:  # a smaller checkpoint: shrink to its size
                self.counts = self.counts[: stored.shape[0]].clone()
                self.mean = self.mean[: stored.shape[0]].clone()
                if self.mode == "per_class":
                    self.scatter = self.scatter[: stored.shape[0]].clone()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"dim={self.dim}, n_classes={self.n_classes}, covariance={self.mode!r}"
