"""The EWC penalty: a quadratic pull towards past solutions weighted by Fisher information.

Kirkpatrick et al., "Overcoming catastrophic forgetting in neural networks", PNAS 2017
(https://arxiv.org/abs/1612.00796), eq. 3: ``L = L_B + sum_i lambda/2 F_i (theta_i - theta*_A,i)^2``.
Online EWC (Schwarz et al., "Progress & Compress", ICML 2018, https://arxiv.org/abs/1805.06370)
keeps one running term: ``F* <- gamma F* + F_new`` anchored at the latest parameters.

Parameters that grow (a classifier head) are penalised on the part that existed when the
term was recorded.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Literal

import torch
from torch import nn
from torch.func import functional_call, grad, vmap


def empirical_fisher(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
) -> dict[str, torch.Tensor]:
    """Diagonal empirical Fisher ``E[(d log p(y|x) / d theta)^2]`` with per-sample gradients.

    Args:
        model: a module whose ``forward`` gives logits; only parameters with ``requires_grad``
            are included.
        batches: ``(x, y)`` pairs.
        loss_fn: ``(logits, y) -> scalar`` negative log-likelihood of one sample.
    """
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}

    def sample_loss(p, x, y):
        return loss_fn(functional_call(model, p, (x.unsqueeze(0),)), y.unsqueeze(0))

    per_sample = vmap(grad(sample_loss), in_dims=(None, 0, 0))
    fisher = {n: torch.zeros_like(p) for n, p in params.items()}
    count = 0
    for x, y in batches:
        grads = per_sample(params, x, y)
        for n, g in grads.items():
            fisher[n] += g.pow(2).sum(0)
        count += len(y)
    return {n: f / max(count, 1) for n, f in fisher.items()}


class FisherPenalty(nn.Module):
    """``sum_k sum_i F_k,i (theta_i - theta*_k,i)^2`` over the recorded terms ``k``.

    Args:
        mode: ``separate`` keeps one term per experience (Kirkpatrick et al.); ``online`` keeps
            one decayed running term (Schwarz et al.).
        decay: ``gamma`` of online EWC.
    """

    def __init__(self, mode: Literal["separate", "online"] = "separate", decay: float = 1.0):
        super().__init__()
        self.mode = mode
        self.decay = decay
        self.terms: list[dict[str, tuple[torch.Tensor, torch.Tensor]]] = []

    def add(self, anchors: dict[str, torch.Tensor], fisher: dict[str, torch.Tensor]) -> None:
        """Record ``theta*`` (``anchors``) and ``F`` (``fisher``) of the experience just learned."""
        term = {n: (anchors[n].detach().clone(), fisher[n].detach().clone()) for n in fisher}
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
