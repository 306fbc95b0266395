"""ROID's self-training loss: diversity- and certainty-weighted soft likelihood ratio, consistency, prior correction.

Marsden et al., "Universal Test-time Adaptation through Weight Ensembling, Diversity Weighting,
and Prior Correction", WACV 2024 (https://arxiv.org/abs/2306.00650), section 3, as in the
authors' code (Döbler et al.'s benchmark, ``classification/methods/roid.py``; CMF, Lee et al.,
ICLR 2024, uses the same loss). For test logits ``z`` with probabilities ``p``:

* soft likelihood ratio (eq. 3, :func:`soft_likelihood_ratio`): ``-sum_c p_c log(p_c / (1 - p_c) + 1e-5)``
  with ``p`` clipped to at most 0.99;
* diversity weight (eq. 4): ``w_div = 1 - cos(p_bar, p)`` against the moving average of the
  batches' mean probabilities ``p_bar <- 0.9 p_bar + 0.1 mean(p)`` (uniform at the start);
  certainty weight (eq. 5): ``w_cert = -H(p)``; each min-max normalised over the batch,
  ``w = exp(w_div w_cert / T)`` (eq. 6), and samples with ``w_div`` below the batch's mean
  ``w_div`` are left out (weight 0);
* consistency (eq. 7): the symmetric cross-entropy between the prediction on one augmentation of
  the kept samples (:class:`TTAugment` with reflect padding, no blur, no noise) and the
  prediction on the samples themselves, weighted by ``w``;
* the loss sums over the kept samples and divides by the configured test batch size, as the
  code does (a smaller last batch weighs less);
* prior correction (eq. 8, :func:`prior_correction`): the returned logits are multiplied
  (the code multiplies logits, not probabilities) by the smoothed batch prior
  ``(pi + s) / (1 + s C)``, ``pi = mean(p)``, ``s = max(1/B, 1/C) / max(pi)``.

A batch whose diversity or certainty scores are all equal (a single sample) has undefined
min-max weights (NaN in the code); here those scores count as 0: every sample kept, weight 1.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from clpeft.components.tta.augment import TTAugment
from clpeft.components.tta.losses import entropy, symmetric_cross_entropy
from clpeft.schema import Options


class CertaintyDiversityOptions(Options):
    """ROID's loss and output options (ROID and CMF; defaults: the benchmark's ``conf.py`` ``ROID.*``)."""

    use_weighting: bool = Field(True, description="diversity and certainty weighting (and selection) of the samples")
    use_prior_correction: bool = Field(True, description="multiply the returned logits by the smoothed batch prior")
    use_consistency: bool = Field(True, description="the consistency term on an augmentation of the kept samples")
    momentum_probs: float = Field(0.9, ge=0, le=1, description="momentum of the moving mean probability vector of the diversity weight")
    temperature: float = Field(1 / 3, gt=0, description="``T`` of the weights ``exp(w_div w_cert / T)``")
    flip: float = Field(0.5, ge=0, le=1, description="horizontal-flip probability of the augmentation (0 for digits-like data)")


def roid_augmentation(flip: float = 0.5) -> TTAugment:
    """The benchmark's ``get_tta_transforms(padding_mode="reflect", cotta_augs=False)``."""
    return TTAugment(flip=flip, blur_sigma=None, noise_std=None, padding="reflect")


def soft_likelihood_ratio(logits: torch.Tensor, clip: float = 0.99, eps: float = 1e-5) -> torch.Tensor:
    """Per-sample soft likelihood ratio loss, shape ``(B,)`` (ROID eq. 3)."""
    p = logits.softmax(1).clamp(0.0, clip)
    return -(p * torch.log(p / (1 - p) + eps)).sum(1)


@torch.no_grad()
def prior_correction(logits: torch.Tensor) -> torch.Tensor:
    """``logits`` times the smoothed prior of the batch (ROID eq. 8, as its code applies it)."""
    b, c = logits.shape
    prior = logits.softmax(1).mean(0)
    smooth = max(1 / b, 1 / c) / prior.max()
    return logits * ((prior + smooth) / (1 + smooth * c))


def _min_max(x: torch.Tensor) -> torch.Tensor:
    return ((x - x.min()) / (x.max() - x.min())).nan_to_num(0.0)


class CertaintyDiversityLoss(nn.Module):
    """ROID's weighted soft-likelihood-ratio and consistency loss with its moving class prior.

    Args:
        options: the weighting (off: every sample, weight 1), the consistency term, ``p_bar``'s
            momentum, ``T``, the augmentation's flips (``use_prior_correction`` is read by
            :meth:`output`).

    ``p_bar`` (``None``: uniform) is part of the ``state_dict``.
    """

    def __init__(self, options: CertaintyDiversityOptions | None = None):
        super().__init__()
        options = options or CertaintyDiversityOptions()
        self.weighting = options.use_weighting
        self.consistency = options.use_consistency
        self.prior_correction = options.use_prior_correction
        self.momentum_probs = options.momentum_probs
        self.temperature = options.temperature
        self.augment = roid_augmentation(options.flip)
        self.class_probs: torch.Tensor | None = None

    @torch.no_grad()
    def weigh(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The weights ``w`` (0 for left-out samples) and the mask of kept samples; moves ``p_bar``."""
        probs = logits.softmax(1)
        prior = self.class_probs if self.class_probs is not None else torch.full_like(probs[0], 1 / probs.shape[1])
        diversity = _min_max(1 - F.cosine_similarity(prior.unsqueeze(0), probs, dim=1))
        left_out = diversity < diversity.mean()
        certainty = _min_max(-entropy(logits))
        weights = torch.exp(diversity * certainty / self.temperature)
        weights[left_out] = 0.0
        self.class_probs = self.momentum_probs * prior + (1 - self.momentum_probs) * probs.mean(0)
        return weights, ~left_out

    def forward(self, net: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, logits: torch.Tensor, batch_size: int) -> torch.Tensor:
        """The loss of the batch ``x`` whose predictions by ``net`` are ``logits``."""
        if self.weighting:
            weights, kept = self.weigh(logits)
        else:
            weights, kept = torch.ones_like(logits[:, 0]), torch.ones_like(logits[:, 0], dtype=torch.bool)
        loss = (soft_likelihood_ratio(logits) * weights)[kept].sum() / batch_size
        if self.consistency:
            augmented = net(self.augment(x[kept]))
            loss = loss + (symmetric_cross_entropy(augmented, logits[kept]) * weights[kept]).sum() / batch_size
        return loss

    def output(self, logits: torch.Tensor) -> torch.Tensor:
        """The prediction returned for ``logits``: prior-corrected when that option is on."""
        logits = logits.detach()
        return prior_correction(logits) if self.prior_correction else logits

    def get_extra_state(self) -> dict:
        return {"class_probs": None if self.class_probs is None else self.class_probs.clone()}

    def set_extra_state(self, state: dict) -> None:
        m = state.get("class_probs")
        self.class_probs = None if m is None else m.clone()

    def _apply(self, fn, *args, **kwargs):
        if self.class_probs is not None:
            self.class_probs = fn(self.class_probs)
        return super()._apply(fn, *args, **kwargs)
