"""Interference-free LoRA updates: each task's ``A`` outside the input subspace of earlier tasks.

Liang & Li, "InfLoRA: Interference-Free Low-Rank Adaptation for Continual Learning", CVPR 2024
(https://arxiv.org/abs/2404.00228; code: github.com/liangyanshuo/InfLoRA). For an adapted layer
``y = W x + B_t A_t x``, fixing ``A_t`` and training only ``B_t`` confines the update to the row
space of ``A_t``; if those rows are orthogonal to the inputs ``x`` that earlier tasks feed the
layer, the update leaves their outputs unchanged. Per layer, :class:`InputSubspace` keeps an
orthonormal basis ``M`` (``d x k``) of those inputs, as Gradient Projection Memory does (Saha,
Garg & Roy, "Gradient Projection Memory for Continual Learning", ICLR 2021, eq. 5-9):

* :meth:`design`, before training task ``t``: with ``C_t`` the mean of ``x x^T`` over the task's
  inputs, the top-``r`` left singular vectors ``U_r`` of ``(I - M M^T) C_t`` give
  ``A_t = U_r^T / sqrt(3)`` (the official scale); ``A_t`` is frozen, ``B_t`` starts at zero.
  Where fewer than ``r`` singular values are above rounding (``M`` spans all or nearly all of
  ``d``, or the task's inputs have fewer than ``r`` directions outside it), the official code
  still takes ``r`` vectors, and the extra ones are an arbitrary completion that may lie inside
  ``span(M)``: its update would change earlier tasks' outputs. Here those rows of ``A_t`` are
  zero (see :meth:`InputSubspace.design`), so the update cannot touch the old subspace;
* :meth:`extend`, after training task ``t``: GPM's criterion with a representation matrix ``R``
  adds the leading left singular vectors of ``(I - M M^T) R`` to ``M`` until the energy of ``R``
  inside ``span(M)`` reaches ``threshold`` of ``||R||_F^2``. Two representations:

  - ``criterion="inflora"`` (default), the official ``update_DualGPM``: ``R = C_t`` itself, so
    the energies are the *squared* eigenvalues of ``C_t`` (it squares the singular values of
    the covariance it stores). After the first task it keeps the directions whose cumulative
    share stays *below* the threshold (at least one; ``np.sum(np.cumsum(ratio) < threshold)``,
    also in the file's GPM-derived ``update_GPM``), one fewer than the paper's rule; later tasks
    add the fewest directions that reach it.
  - ``criterion="gpm"``: GPM's definition, ``R`` the matrix of the inputs (``R R^T = C_t``), so
    the energies are the eigenvalues of ``C_t``, and every task adds the fewest directions that
    reach the threshold (eq. 5 and 9). The eigenvalues of a covariance decay more slowly than
    their squares, so at the same threshold this protects many more directions.

The threshold may follow the official code's schedule over the tasks, ``epsilon_t = lamb +
(lame - lamb) t / T`` after task ``t`` of ``T`` (``threshold=(lamb, lame)``; e.g. ``(0.95, 1.0)``
on CIFAR-100).

Kept apart from the official code on purpose (``tests/reference/test_inflora.py`` shows both):
DualGPM stores the complement of ``span(M)`` once ``M`` spans over half of ``d`` (``retain``); here
``M`` is always stored (the same projection, one representation). And where the first task's
basis spans half of ``d`` or more, the official code labels ``M`` itself as the complement and then
fails its own check (``assert``); here ``M`` is kept as selected.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Literal

import torch
from torch import nn

from clpeft.components.lora.input_moments import input_moments
from clpeft.components.lora.layer import LoRALinear

Criterion = Literal["inflora", "gpm"]


class InputSubspace(nn.Module):
    """Per adapted layer, a basis ``M`` of earlier tasks' inputs; designs ``A`` outside it (InfLoRA).

    Args:
        layers: the adapted layers, by module path.
        threshold: GPM's ``epsilon``: the fraction of a task's input energy that ``span(M)``
            must hold after :meth:`extend`; or ``(start, end)``, interpolated by the ``progress``
            :meth:`extend` is given (InfLoRA's ``lamb``, ``lame``).
        criterion: how :meth:`extend` measures energy: ``inflora`` (the official code: squared
            eigenvalues of the covariance) or ``gpm`` (GPM's definition: its eigenvalues); see
            the module docs.

    Buffers: ``basis_<i>`` (``d_i x k_i``, float64) per layer, part of the state dict
    (loading resizes them).
    """

    def __init__(self, layers: Mapping[str, LoRALinear], threshold: float | tuple[float, float] = 0.97, criterion: Criterion = "inflora"):
        super().__init__()
        self.paths = list(layers)
        self.threshold = threshold
        self.criterion = criterion
        for i, layer in enumerate(layers.values()):
            self.register_buffer(f"basis_{i}", torch.zeros(layer.base_layer.in_features, 0, dtype=torch.float64))

    def basis(self, i: int) -> torch.Tensor:
        return getattr(self, f"basis_{i}")

    @staticmethod
    @torch.no_grad()
    def covariances(layers: Mapping[str, LoRALinear], run: Callable[[], None]) -> list[torch.Tensor]:
        """``C = mean x x^T`` of every layer's inputs (float64) over what ``run()`` feeds the model;
        summed over the ranks of a data-parallel run."""
        return [outer / max(count, 1.0) for _, outer, count in input_moments(layers, run).values()]

    @torch.no_grad()
    def design(self, layers: Mapping[str, LoRALinear], covariances: list[torch.Tensor]) -> list[int]:
        """Set and freeze every layer's current ``A`` to InfLoRA's design (``B`` is left as is); returns
        how many rows of each layer's ``A`` are directions, the rest being zero.

        Row ``j`` is the ``j``-th left singular vector of ``(I - M M^T) C`` over ``sqrt(3)`` (the
        official design) where its singular value exceeds ``sqrt(eps) ||C||_2`` (float64's ``eps``;
        below that it is rounding: ``M``'s orthonormality holds to about ``1e-13``), and zero
        otherwise: a zero row adds nothing to the output and its column of ``B`` gets no gradient,
        so a layer whose subspace leaves fewer than ``r`` directions trains only on those (none
        where ``M`` spans everything) and leaves earlier tasks' inputs untouched.
        """
        designed = []
        for i, (layer, cov) in enumerate(zip(layers.values(), covariances, strict=True)):
            basis = self.basis(i).to(cov.device)
            projected = cov - basis @ (basis.T @ cov)
            u, values, _ = torch.linalg.svd(projected)
            a = u[:, : layer.rank].T / math.sqrt(3)
            floor = math.sqrt(torch.finfo(cov.dtype).eps) * float(torch.linalg.matrix_norm(cov, 2))
            k = int((values[: layer.rank] > floor).sum())
            a[k:] = 0
            layer.lora_A = nn.Parameter(a.to(layer.lora_A), requires_grad=False)
            designed.append(k)
        return designed

    @torch.no_grad()
    def extend(self, covariances: list[torch.Tensor], progress: float = 0.0) -> list[int]:
        """GPM's update of every basis with a finished task's input covariance, by :attr:`criterion`;
        returns the number of directions added per layer.

        ``progress``: ``t / T`` for task ``t`` of ``T``, where the threshold is a schedule.
        """
        start, end = self.threshold if isinstance(self.threshold, tuple) else (self.threshold,) * 2
        epsilon = start + (end - start) * progress
        added = []
        for i, cov in enumerate(covariances):
            basis = self.basis(i).to(cov.device)
            gram = cov @ cov if self.criterion == "inflora" else cov  # R R^T of the representation R
            total = float(torch.trace(gram))
            inside = float(torch.trace(basis.T @ gram @ basis)) if basis.shape[1] else 0.0
            outside = torch.eye(cov.shape[0], dtype=cov.dtype, device=cov.device) - basis @ basis.T
            values, vectors = torch.linalg.eigh(outside @ gram @ outside)  # left singular vectors of (I - M M^T) R
            values, vectors = values.flip(0).clamp(min=0), vectors.flip(1)
            k = self._directions(values, epsilon * total - inside, first=not basis.shape[1])
            k = min(k, cov.shape[0] - basis.shape[1])
            setattr(self, f"basis_{i}", torch.cat([basis, vectors[:, :k]], dim=1).to(self.basis(i).device))
            added.append(k)
        return added

    def _directions(self, values: torch.Tensor, needed: float, first: bool) -> int:
        """How many of the leading ``values`` (energies, descending) :meth:`extend` adds to cover ``needed``."""
        below = int(torch.searchsorted(values.cumsum(0), values.new_tensor(needed)))  # prefixes still short of it
        if first and self.criterion == "inflora":
            return max(below, 1)  # the official first task: one fewer, at least one
        return 0 if needed <= 0 else below + 1

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for i in range(len(self.paths)):
            stored = state_dict.get(f"{prefix}basis_{i}")
            if stored is not None:
                setattr(self, f"basis_{i}", torch.zeros_like(stored, device=self.basis(i).device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        dims = ", ".join(f"{self.basis(i).shape[1]}/{self.basis(i).shape[0]}" for i in range(len(self.paths)))
        return f"threshold={self.threshold}, criterion={self.criterion}, basis dims: {dims}"
