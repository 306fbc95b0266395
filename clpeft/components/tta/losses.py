"""Losses and sample filters of test-time adaptation methods.

* Entropy ``H(y) = -sum_c p_c log p_c`` (Tent, Wang et al., ICLR 2021, eq. 1).
* Soft cross-entropy to a teacher, ``-sum_c p'_c log p_c`` (CoTTA, Wang et al., CVPR 2022, eq. 2).
* Symmetric cross-entropy to a teacher (RMT, Döbler et al., CVPR 2023,
  https://arxiv.org/abs/2211.13081, eq. 3), with the weighting of the authors' code:
  ``-(1 - a) sum_c q_c log p_c - a sum_c p_c log q_c`` (student ``p``, teacher ``q``, ``a = 1/2``).
* The multi-view contrastive loss RMT applies to a test image, its augmentation and its nearest
  source prototype (Döbler et al., eq. 4, the supervised-contrastive loss of Khosla et al.,
  NeurIPS 2020, eq. 2, with the views of one sample as its only positives).
* EATA's sample selection and weighting (Niu et al., "Efficient Test-Time Model Adaptation
  without Forgetting", ICML 2022, https://arxiv.org/abs/2204.02610):
  reliable samples ``H(x) < E_0`` (eq. 3, ``E_0 = 0.4 ln C``), weighted by
  ``1 / exp(H(x) - E_0)``; non-redundant samples ``|cos(m, p(x))| < epsilon`` (eq. 5) against
  the moving average ``m <- 0.9 m + 0.1 mean(p)`` of the selected samples' probabilities (eq. 4);
  and the importance of each parameter for the Fisher regulariser (eq. 9).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Per-sample entropy of ``softmax(logits)``, shape ``(B,)``."""
    return -(logits.softmax(1) * logits.log_softmax(1)).sum(1)


def soft_cross_entropy(student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
    """Per-sample ``-sum_c softmax(teacher)_c log softmax(student)_c`` (teacher is not detached)."""
    return -(teacher_logits.softmax(1) * student_logits.log_softmax(1)).sum(1)


def symmetric_cross_entropy(student_logits: torch.Tensor, teacher_logits: torch.Tensor, alpha: float = 0.5) -> torch.Tensor:
    """Per-sample symmetric cross-entropy between student and teacher (RMT, eq. 3)."""
    return (1 - alpha) * soft_cross_entropy(student_logits, teacher_logits) + alpha * soft_cross_entropy(teacher_logits, student_logits)


def multi_view_contrastive_loss(z: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """Contrastive loss of ``V`` views of ``B`` samples, ``z`` of shape ``(B, V, D)``, L2-normalised.

    Every view ``a`` is an anchor; the other views of its sample are its positives ``P(a)``, and
    all ``BV - 1`` other views form the denominator:
    ``-1/(BV) sum_a 1/|P(a)| sum_{p in P(a)} log(exp(z_a.z_p / t) / sum_{k != a} exp(z_a.z_k / t))``.
    """
    b, v, _ = z.shape
    flat = z.transpose(0, 1).reshape(v * b, -1)
    itself = torch.eye(v * b, dtype=torch.bool, device=z.device)
    similarity = (flat @ flat.T / temperature).masked_fill(itself, float("-inf"))
    log_prob = similarity - torch.logsumexp(similarity, dim=1, keepdim=True)
    sample = torch.arange(b, device=z.device).repeat(v)
    positive = (sample[:, None] == sample[None, :]) & ~itself
    return -(log_prob.masked_fill(~positive, 0.0).sum(1) / positive.sum(1)).mean()


class EATASampleFilter(nn.Module):
    """EATA's reliable + non-redundant sample selection and re-weighting.

    Args:
        entropy_margin: ``E_0`` (absolute, in nats); EATA uses ``0.4 * ln C``.
        redundancy_margin: ``epsilon`` of the cosine-similarity filter.
        decay: moving-average factor of the probability vector ``m`` (0.9 in the paper).

    The moving average is part of the ``state_dict``.
    """

    def __init__(self, entropy_margin: float, redundancy_margin: float = 0.05, decay: float = 0.9):
        super().__init__()
        self.entropy_margin = entropy_margin
        self.redundancy_margin = redundancy_margin
        self.decay = decay
        self.moving_probs: torch.Tensor | None = None

    @torch.no_grad()
    def select(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Boolean mask of the selected samples and their weights ``1/exp(H - E_0)``; updates ``m``.

        Reliable: ``H < E_0``. Non-redundant (once ``m`` exists): ``|cos(m, p)| < epsilon``.
        ``m`` is updated with the probabilities of the selected samples (or of the reliable
        ones on the first batch, when there is no ``m`` yet), as in the authors' code.
        """
        ent = entropy(logits.float())
        probs = logits.float().softmax(1)
        selected = ent < self.entropy_margin
        if self.moving_probs is not None:
            cosine = F.cosine_similarity(self.moving_probs.unsqueeze(0), probs, dim=1)
            selected &= cosine.abs() < self.redundancy_margin
        chosen = probs[selected]
        if len(chosen):
            mean = chosen.mean(0)
            self.moving_probs = mean if self.moving_probs is None else self.decay * self.moving_probs + (1 - self.decay) * mean
        weights = torch.exp(self.entropy_margin - ent)
        return selected, weights

    def get_extra_state(self) -> dict:
        return {"moving_probs": None if self.moving_probs is None else self.moving_probs.clone()}

    def set_extra_state(self, state: dict) -> None:
        m = state.get("moving_probs")
        self.moving_probs = None if m is None else m.clone()

    def _apply(self, fn, *args, **kwargs):
        if self.moving_probs is not None:
            self.moving_probs = fn(self.moving_probs)
        return super()._apply(fn, *args, **kwargs)


def batch_gradient_importance(
    model: nn.Module, batches: Iterable[torch.Tensor], params: dict[str, nn.Parameter]
) -> dict[str, torch.Tensor]:
    """EATA's parameter importance: mean over mini-batches of the squared gradient of the
    cross-entropy to the model's own predictions (pseudo-labels).

    The paper (eq. 9) squares per-sample gradients; the authors' code (and the published
    ``fisher_alpha`` values, tuned with it) squares the mini-batch gradient, which is what this
    computes. ``model`` maps a batch to logits; ``params`` are the parameters to weigh.
    """
    importance = {n: torch.zeros_like(p) for n, p in params.items()}
    count = 0
    for x in batches:
        logits = model(x)
        loss = F.cross_entropy(logits, logits.detach().argmax(1))
        grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
        for (n, _), g in zip(params.items(), grads):
            if g is not None:
                importance[n] += g.detach() ** 2
        count += 1
    return {n: v / max(count, 1) for n, v in importance.items()}
