"""Classifier heads that grow with the label space."""

from __future__ import annotations

import math

import torch
from torch import nn


def _grown_parameter(param: nn.Parameter, rows: torch.Tensor) -> nn.Parameter:
    """``param`` with ``rows`` appended along dim 0, keeping its ``requires_grad``."""
    return nn.Parameter(torch.cat([param.data, rows.to(param.device, param.dtype)]), requires_grad=param.requires_grad)


def _resized_parameter(param: nn.Parameter, n_rows: int) -> nn.Parameter:
    """An uninitialised ``param`` with ``n_rows`` rows (for loading a state of another size)."""
    return nn.Parameter(param.data.new_empty((n_rows, *param.shape[1:])), requires_grad=param.requires_grad)


class _GrowingHead(nn.Module):
    """A head whose per-class parameters (``_row_parameters``, first dimension = class) grow with new classes.

    Old rows are kept exactly; a subclass draws the new ones in :meth:`_new_rows`. Loading a
    state dict resizes the parameters to the stored size, so a checkpoint taken after any
    experience loads into a freshly built head.
    """

    _row_parameters: tuple[str, ...] = ("weight",)

    def __init__(self, in_features: int):
        super().__init__()
        self.in_features = in_features
        self.weight = nn.Parameter(torch.empty(0, in_features))

    @property
    def n_classes(self) -> int:
        return self.weight.shape[0]

    def grow_to(self, n_classes: int) -> None:
        """Add outputs up to ``n_classes``; a no-op when the head is already that large."""
        extra = n_classes - self.n_classes
        if extra <= 0:
            return
        for name, rows in zip(self._row_parameters, self._new_rows(extra), strict=True):
            setattr(self, name, _grown_parameter(getattr(self, name), rows))

    def _new_rows(self, extra: int) -> tuple[torch.Tensor, ...]:
        """Initial values of ``extra`` new rows, one tensor per name in ``_row_parameters``."""
        raise NotImplementedError

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        stored = state_dict.get(prefix + "weight")
        if stored is not None and stored.shape[0] != self.n_classes:
            for name in self._row_parameters:
                setattr(self, name, _resized_parameter(getattr(self, name), stored.shape[0]))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, n_classes={self.n_classes}"


class LinearHead(_GrowingHead):
    """A linear classifier whose output grows as new classes arrive.

    Old rows are kept exactly when the head grows; new rows get PyTorch's default
    ``nn.Linear`` initialisation. Loading a state dict resizes the head to the stored size,
    so a checkpoint taken after any experience loads into a freshly built strategy.

    Args:
        in_features: feature dimension.
        n_classes: initial number of outputs (usually 0: the first experience grows it).
    """

    _row_parameters = ("weight", "bias")

    def __init__(self, in_features: int, n_classes: int = 0):
        super().__init__(in_features)
        self.bias = nn.Parameter(torch.empty(0))
        self.grow_to(n_classes)

    def _new_rows(self, extra: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``nn.Linear``'s initialisation, drawn on the head's device in its dtype."""
        new_w = torch.empty(extra, self.in_features, device=self.weight.device, dtype=self.weight.dtype)
        nn.init.kaiming_uniform_(new_w, a=math.sqrt(5))
        bound = 1.0 / math.sqrt(self.in_features) if self.in_features else 0.0
        new_b = torch.empty(extra, device=self.bias.device, dtype=self.bias.dtype).uniform_(-bound, bound)
        return new_w, new_b

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(features, self.weight.to(features.dtype), self.bias.to(features.dtype))


class CosineHead(_GrowingHead):
    """Cosine classifier ``logit_c = s * cos(x, w_c)`` whose output grows with new classes.

    The cosine-normalised linear layer of Hou et al., "Learning a Unified Classifier
    Incrementally via Rebalancing" (CVPR 2019), as used by SimpleCIL/APER and RanPAC's
    first-session adaptation (scale ``s`` learnable, initialised to 1, there called sigma).
    New rows are drawn from U(-1/sqrt(D), 1/sqrt(D)); old rows are kept exactly.

    Args:
        in_features: feature dimension ``D``.
        n_classes: initial number of outputs.
        scale: the scale ``s`` (its initial value when learnable).
        learn_scale: make ``s`` a trainable parameter (otherwise a fixed buffer).
    """

    def __init__(self, in_features: int, n_classes: int = 0, scale: float = 1.0, learn_scale: bool = True):
        super().__init__(in_features)
        if learn_scale:
            self.scale = nn.Parameter(torch.tensor(float(scale)))
        else:
            self.register_buffer("scale", torch.tensor(float(scale)))
        self.grow_to(n_classes)

    def _new_rows(self, extra: int) -> tuple[torch.Tensor]:
        """U(-1/sqrt(D), 1/sqrt(D)), drawn on the CPU in float32."""
        bound = 1.0 / math.sqrt(self.in_features)
        return (torch.empty(extra, self.in_features).uniform_(-bound, bound),)

    def cosines(self, features: torch.Tensor) -> torch.Tensor:
        """``cos(x, w_c)`` of every class, unscaled (LUCIR's margin ranking loss, eq. 8, ranks them)."""
        w = nn.functional.normalize(self.weight.to(features.dtype), dim=1)
        return nn.functional.linear(nn.functional.normalize(features, dim=1), w)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.scale.to(features.dtype) * self.cosines(features)


class _ClosedFormHead(nn.Module):
    """A head with no trainable parameters: float64 per-class buffers set in closed form.

    Subclasses list their per-class buffers (first dimension = class) in ``_class_buffers``;
    growing appends zero rows, loading a state dict resizes them to the stored sizes. Logits
    are computed in float64 with autocast off (the closed forms subtract large terms, and a
    bf16 evaluation would not match the statistics they were fitted on) and returned in the
    features' dtype.
    """

    _class_buffers: tuple[str, ...] = ()

    def __init__(self, in_features: int, n_classes: int = 0):
        super().__init__()
        self.in_features = in_features
        for name in self._class_buffers:
            shape = (0, in_features) if name != "bias" else (0,)
            self.register_buffer(name, torch.zeros(shape, dtype=torch.float64))
        self.grow_to(n_classes)

    @property
    def n_classes(self) -> int:
        return getattr(self, self._class_buffers[0]).shape[0]

    def grow_to(self, n_classes: int) -> None:
        """Add (zero) rows up to ``n_classes``; a no-op when the head is already that large."""
        extra = n_classes - self.n_classes
        for name in self._class_buffers if extra > 0 else ():
            old = getattr(self, name)
            setattr(self, name, torch.cat([old, old.new_zeros(extra, *old.shape[1:])]))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        with torch.autocast(features.device.type, enabled=False):
            return self.logits(features.to(torch.float64)).to(features.dtype)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Float64 logits of float64 features."""
        raise NotImplementedError

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for name in self._class_buffers:
            stored = state_dict.get(prefix + name)
            if stored is not None:
                setattr(self, name, torch.zeros_like(stored, dtype=torch.float64, device=getattr(self, name).device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, n_classes={self.n_classes}"


class PrototypeHead(_ClosedFormHead):
    """Nearest-class-mean classifier: logits are similarities to class prototypes.

    SimpleCIL (Zhou et al., 2023, arXiv:2303.07338) sets each class's prototype to its mean
    feature ``p_c = 1/n_c sum_i f(x_i)`` and classifies by cosine similarity; iCaRL's NME
    (Rebuffi et al., 2017) uses the (negative) Euclidean distance.

    ``metric='cosine'``: ``logit_c = s * cos(x, p_c)``; ``metric='euclidean'``:
    ``logit_c = -s * ||x - p_c||^2``. Rows never set hold a zero prototype (cosine 0).

    Args:
        in_features: feature dimension.
        n_classes: initial number of classes.
        metric: ``cosine`` or ``euclidean``.
        scale: the factor ``s`` (does not change predictions; sharpens softmax outputs).
    """

    _class_buffers = ("prototypes",)

    def __init__(self, in_features: int, n_classes: int = 0, metric: str = "cosine", scale: float = 1.0):
        if metric not in ("cosine", "euclidean"):
            raise ValueError(f"metric must be 'cosine' or 'euclidean', not {metric!r}")
        super().__init__(in_features, n_classes)
        self.metric = metric
        self.scale = scale

    @torch.no_grad()
    def set_prototypes(self, prototypes: torch.Tensor, classes: torch.Tensor | None = None) -> None:
        """Set the prototypes of ``classes`` (default: rows ``0..len(prototypes)-1``)."""
        classes = torch.arange(len(prototypes)) if classes is None else classes
        self.grow_to(int(classes.max()) + 1 if len(classes) else 0)
        self.prototypes[classes.to(self.prototypes.device)] = prototypes.to(self.prototypes)

    def fit(self, stats) -> None:
        """Prototypes := class means of a :class:`~clpeft.components.heads.class_statistics.ClassStatistics`
        (classes it has seen; the other rows are left as they are)."""
        seen = torch.nonzero(stats.seen()).flatten()
        self.set_prototypes(stats.means()[seen], seen)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        if self.metric == "cosine":
            return self.scale * nn.functional.normalize(x, dim=1) @ nn.functional.normalize(self.prototypes, dim=1).T
        return -self.scale * torch.cdist(x, self.prototypes).square()

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, metric={self.metric!r}, scale={self.scale}"


def regularised_covariance(covariance: torch.Tensor, shrinkage: float = 0.0, ridge: float = 0.0) -> torch.Tensor:
    """``(1 - a) S + a * tr(S)/D * I + r * I`` with ``a`` = ``shrinkage``, ``r`` = ``ridge``.

    The first two terms are sklearn's ``shrunk_covariance`` (Ledoit-Wolf style shrinkage
    towards a scaled identity); the ridge is FSA's ``S + I`` (Panos et al., 2023).
    """
    d = covariance.shape[0]
    eye = torch.eye(d, dtype=covariance.dtype, device=covariance.device)
    mu = torch.trace(covariance) / d
    return (1.0 - shrinkage) * covariance + (shrinkage * mu + ridge) * eye


class LDAHead(_ClosedFormHead):
    """Linear discriminant analysis head with a shared covariance (equal class priors).

    ``logit_c = x^T S^-1 mu_c - 1/2 mu_c^T S^-1 mu_c`` with the regularised shared covariance
    ``S = (1 - a) Sigma + a tr(Sigma)/D I + r I`` (see :func:`regularised_covariance`): the LDA
    head of FSA (Panos et al., ICCV 2023, arXiv:2303.13199, ``r = 1``) and of streaming LDA
    (Hayes & Kanan, 2020). Against sklearn: with ``Sigma`` the within-class covariance divided
    by ``N`` this equals ``LinearDiscriminantAnalysis(solver='lsqr', shrinkage=a)``'s
    ``decision_function`` minus ``log(prior_c)`` (sklearn adds the log class prior; this head
    assumes equal priors, as FSA does).

    Args:
        in_features: feature dimension ``D``.
        n_classes: initial number of classes.
        shrinkage: ``a`` in [0, 1].
        ridge: ``r`` >= 0.
    """

    _class_buffers = ("weight", "bias")

    def __init__(self, in_features: int, n_classes: int = 0, shrinkage: float = 0.0, ridge: float = 0.0):
        if not 0.0 <= shrinkage <= 1.0 or ridge < 0:
            raise ValueError(f"need 0 <= shrinkage <= 1 and ridge >= 0, got {shrinkage}, {ridge}")
        super().__init__(in_features, n_classes)
        self.shrinkage = shrinkage
        self.ridge = ridge

    @torch.no_grad()
    def fit(self, means: torch.Tensor, covariance: torch.Tensor) -> None:
        """Set every class from its mean ``mu_c`` (rows of ``means``) and the shared ``Sigma``."""
        mu = means.to(self.weight.device, torch.float64)
        cov = regularised_covariance(covariance.to(mu), self.shrinkage, self.ridge)
        self.grow_to(len(mu))
        weight = torch.linalg.solve(cov, mu.T).T
        self.weight[: len(mu)] = weight
        self.bias[: len(mu)] = -0.5 * (weight * mu).sum(1)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight.T + self.bias

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, shrinkage={self.shrinkage}, ridge={self.ridge}"


class RidgeHead(_ClosedFormHead):
    """Ridge-regression readout ``W = (G + lambda I)^-1 C``, logits ``x W`` (no bias).

    RanPAC's decorrelated class prototypes (McDonnell et al., NeurIPS 2023, arXiv:2307.02251,
    eq. 4): ``G = sum_i h_i h_i^T`` is the Gram matrix of the (projected) features and
    ``C = sum_i h_i y_i^T`` holds the per-class feature sums (one-hot targets ``y``).

    ``metric='linear'`` gives eq. 4's ``h^T w_c`` (the authors' RanPAC/RanPAC code);
    ``metric='cosine'`` gives ``cos(h, w_c)``, what LAMDA-PILOT's ``models/ranpac.py`` computes,
    because it puts ``W`` into a ``CosineLinear`` layer that normalises its input and weights
    (times a learned ``sigma > 0``, which changes no prediction).

    Args:
        in_features: feature dimension.
        n_classes: initial number of classes.
        metric: ``linear`` or ``cosine``.
    """

    _class_buffers = ("weight",)

    def __init__(self, in_features: int, n_classes: int = 0, metric: str = "linear"):
        if metric not in ("linear", "cosine"):
            raise ValueError(f"metric must be 'linear' or 'cosine', not {metric!r}")
        super().__init__(in_features, n_classes)
        self.metric = metric

    @torch.no_grad()
    def fit(self, gram: torch.Tensor, class_sums: torch.Tensor, ridge: float) -> None:
        """Solve for every class: ``gram`` (D, D), ``class_sums`` (C, D) = ``C^T``."""
        g = gram.to(self.weight.device, torch.float64)
        sums = class_sums.to(g)
        self.grow_to(len(sums))
        eye = torch.eye(len(g), dtype=g.dtype, device=g.device)
        self.weight[: len(sums)] = torch.linalg.solve(g + ridge * eye, sums.T).T

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        if self.metric == "cosine":
            return nn.functional.normalize(x, dim=1) @ nn.functional.normalize(self.weight, dim=1).T
        return x @ self.weight.T

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, metric={self.metric!r}"


def ridge_by_holdout(
    fit_gram: torch.Tensor, fit_sums: torch.Tensor, val_gram: torch.Tensor, val_sums: torch.Tensor, val_count: float, candidates
) -> tuple[float, list[float]]:
    """RanPAC's choice of ``lambda``: the candidate whose ridge solution on a fit split has the
    lowest mean squared error to the one-hot targets of a held-out split.

    Everything comes from sufficient statistics (no per-sample features): with
    ``W = (G_f + lambda I)^-1 C_f`` the held-out squared error is
    ``tr(W^T G_v W) - 2 tr(W^T C_v) + n_v``. One eigendecomposition ``G_f = V diag(e) V^T``
    serves every candidate. ``*_sums`` are (C, D) per-class feature sums. Returns the chosen
    lambda and the loss of every candidate (sum of squares / (n_v * C), i.e. ``F.mse_loss``).
    """
    g = fit_gram.to(torch.float64)
    evals, evecs = torch.linalg.eigh(g)
    evals = evals.clamp_min(0)
    projected = evecs.T @ fit_sums.to(g).T  # V^T C_f, (D, C)
    val_gram, val_sums = val_gram.to(g), val_sums.to(g).T
    losses = []
    for lam in candidates:
        w = evecs @ (projected / (evals + lam)[:, None])
        sq = (w * (val_gram @ w)).sum() - 2 * (w * val_sums).sum() + val_count
        losses.append(float(sq) / max(val_count * w.shape[1], 1.0))
    best = min(range(len(losses)), key=losses.__getitem__)
    return float(candidates[best]), losses
