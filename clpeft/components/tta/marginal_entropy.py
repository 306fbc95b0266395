"""The entropy of the marginal prediction over augmented views (MEMO).

Zhang et al., "MEMO: Test Time Robustness via Adaptation and Augmentation", NeurIPS 2022
(https://arxiv.org/abs/2110.09506), eq. 1-2: for ``B`` views of one test point,

    p_bar = 1/B sum_b p(y | x_b),     L = H(p_bar) = - sum_c p_bar_c log p_bar_c,

computed in log space as the authors' code (``log p_bar = logsumexp_b log p_b - log B``, clamped
at the dtype's most negative finite value so that an impossible class contributes 0).
"""

from __future__ import annotations

import math

import torch


def marginal_entropy(logits: torch.Tensor) -> torch.Tensor:
    """``H(mean_b softmax(logits_b))`` of ``(B, C)`` logits, a scalar."""
    log_probs = logits - logits.logsumexp(dim=-1, keepdim=True)
    log_mean = log_probs.logsumexp(dim=0) - math.log(logits.shape[0])
    log_mean = log_mean.clamp(min=torch.finfo(log_mean.dtype).min)
    return -(log_mean * log_mean.exp()).sum(dim=-1)
