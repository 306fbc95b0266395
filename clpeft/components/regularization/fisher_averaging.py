"""CoFiMA's continual Fisher-weighted model averaging: each task's model averaged with the previous one, weighted per parameter by their Fisher information.

Marouf, Roy, Tartaglione & Lathuilière, "Weighted Ensemble Models Are Strong Continual Learners",
ECCV 2024 (https://arxiv.org/abs/2312.08977; code: LAMDA-PILOT ``models/cofima.py``), eq. 4-5:

    theta_t <- ((1 - lambda) F_{t-1} theta_{t-1} + lambda F_t theta_t) / ((1 - lambda) F_{t-1} + lambda F_t),

with ``theta_{t-1}`` the averaged model after the previous task, ``theta_t`` the model after
training task ``t`` and ``F`` the diagonal Fisher of each, computed as the official code does:
the mean over the task's mini-batches of the squared gradient of the batch's mean cross-entropy,
clipped at ``1e-4`` (:func:`batch_fisher`). ``lambda`` weights the new model (0.4 in the paper's
runs); without the Fisher it is the plain average ``(1 - lambda) theta_{t-1} + lambda theta_t``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import nn


def batch_fisher(params: Mapping[str, nn.Parameter], losses: Iterable[torch.Tensor], max_value: float = 1e-4) -> dict[str, torch.Tensor]:
    """``min(mean_b (d L_b / d theta)^2, max_value)`` over the batches' losses ``L_b`` (CoFiMA's
    ``getFisherDiagonal``); a parameter no loss reaches gets 0."""
    fisher = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    count = 0
    for loss in losses:
        grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
        for (name, _), g in zip(params.items(), grads, strict=True):
            if g is not None:
                fisher[name] += g.detach().float().pow(2)
        count += 1
    return {n: (f / max(count, 1)).clamp_max(max_value) for n, f in fisher.items()}


def fisher_weighted_average(
    previous: Mapping[str, torch.Tensor],
    current: Mapping[str, torch.Tensor],
    weight: float,
    previous_fisher: Mapping[str, torch.Tensor] | None = None,
    current_fisher: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """Eq. 4-5 for every tensor of ``current`` (``weight`` = ``lambda``), or the plain weighted
    average without Fishers. Where both Fishers are 0 (no gradient reached the parameter in either
    task) the plain average is taken, where the official code divides 0 by 0."""
    out = {}
    for name, theta1 in current.items():
        theta0 = previous[name].to(theta1)
        plain = (1 - weight) * theta0 + weight * theta1
        if previous_fisher is None:
            out[name] = plain
            continue
        f0 = (1 - weight) * previous_fisher[name].to(theta1)
        f1 = weight * current_fisher[name].to(theta1)
        total = f0 + f1
        out[name] = torch.where(total > 0, (f0 * theta0 + f1 * theta1) / torch.where(total > 0, total, 1), plain)
    return out


class TensorSnapshot(nn.Module):
    """Named tensors kept as buffers (saved and resumed with the model; empty until :meth:`store`).

    Parameter names hold dots, which buffer names may not: they are stored with ``/`` instead.
    A fresh, empty snapshot loads any stored one.
    """

    def store(self, tensors: Mapping[str, torch.Tensor]) -> None:
        for name, value in tensors.items():
            self.register_buffer(name.replace(".", "/"), value.detach().clone())

    def tensors(self) -> dict[str, torch.Tensor]:
        return {name.replace("/", "."): value for name, value in self._buffers.items()}

    def is_empty(self) -> bool:
        return not self._buffers

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for key, value in state_dict.items():
            name = key[len(prefix) :]
            if key.startswith(prefix) and "." not in name:
                self.register_buffer(name, torch.empty_like(value))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
