"""The quadratic pull towards past solutions that EWC, SI and MAS share.

All three add ``sum_i Omega_i (theta_i - theta*_i)^2`` to the loss and differ only in the
importance ``Omega``: the Fisher information (EWC; Kirkpatrick et al., PNAS 2017,
https://arxiv.org/abs/1612.00796, eq. 3), the path integral of the loss (SI; Zenke et al.,
ICML 2017, https://arxiv.org/abs/1703.04200, eq. 4-5,
:mod:`~clpeft.components.regularization.path_integral`) or the sensitivity of the output's
norm (MAS; Aljundi et al., ECCV 2018, https://arxiv.org/abs/1711.09601, eq. 4-6,
:mod:`~clpeft.components.regularization.output_sensitivity`). Terms are kept apart, one per
experience (``separate``: EWC as in the paper), or folded into one running term anchored at the
latest parameters (``online``: ``Omega <- gamma Omega + Omega_new``; online EWC, Schwarz et al.,
ICML 2018, https://arxiv.org/abs/1805.06370; SI with ``gamma = 1``; MAS with ``gamma = alpha``).

Parameters that grow (a classifier head) are penalised on the part that existed when the
term was recorded.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import nn


class QuadraticPenalty(nn.Module):
    """``sum_k sum_i Omega_k,i (theta_i - theta*_k,i)^2`` over the recorded terms ``k``.

    Args:
        mode: ``separate`` keeps one term per experience; ``online`` keeps one decayed
            running term anchored at the latest parameters.
        decay: ``gamma``, the weight of the running importance when a new one is added (online).
    """

    def __init__(self, mode: Literal["separate", "online"] = "separate", decay: float = 1.0):
        super().__init__()
        self.mode = mode
        self.decay = decay
        self.terms: list[dict[str, tuple[torch.Tensor, torch.Tensor]]] = []

    def add(self, anchors: dict[str, torch.Tensor], importance: dict[str, torch.Tensor]) -> None:
        """Record ``theta*`` (``anchors``) and ``Omega`` (``importance``) of the experience just learned."""
        term = {n: (anchors[n].detach().clone(), importance[n].detach().clone()) for n in importance}
        if self.mode == "online" and self.terms:
            for n, (_, f_old) in self.terms[0].items():
                if n in term:
                    anchor, f_new = term[n]
                    f_new[tuple(slice(0, s) for s in f_old.shape)] += self.decay * f_old.to(f_new.device)
            self.terms = [term]
        else:
            self.terms.append(term)

    def forward(self, named_parameters: dict[str, torch.Tensor]) -> torch.Tensor:
        total = torch.zeros(())
        for term in self.terms:
            for n, (anchor, f) in list(term.items()):
                p = named_parameters[n]
                if anchor.device != p.device:
                    anchor, f = anchor.to(p.device), f.to(p.device)
                    term[n] = (anchor, f)
                part = p[tuple(slice(0, s) for s in anchor.shape)]
                total = total.to(p.device) + (f * (part - anchor).pow(2)).sum()
        return total

    def get_extra_state(self) -> dict:
        return {"terms": _copy_terms(self.terms)}

    def set_extra_state(self, state: dict) -> None:
        self.terms = _copy_terms(state["terms"])


def _copy_terms(terms):
    return [{n: (a.clone(), f.clone()) for n, (a, f) in term.items()} for term in terms]
