"""RPL: robust pseudo-labelling with the generalized cross-entropy.

Rusak et al., "If your data distribution shifts, use self-learning", TMLR 2022
(https://arxiv.org/abs/2104.12928), section 3: on every test batch one optimizer step on the
mean generalized cross-entropy (Zhang & Sabuncu 2018, eq. 6, :func:`generalized_cross_entropy`)

    L_q = (1 - p(y_hat | x)^q) / q,   y_hat = argmax_c p(c | x)

of the model's own hard predictions, which bounds the pull of wrong pseudo-labels. The
prediction returned is the one before the step. Adapted: the norm layers' affine parameters;
BatchNorm normalises with test-batch statistics. Defaults are the CIFAR-10-C settings of
Döbler et al.'s benchmark (``cfgs/cifar10_c/rpl.yaml`` over ``conf.py``: Adam lr 1e-3,
``q = 0.8``).

Paper symbols: ``q`` -> ``q``.
"""

from typing import Annotated

import torch
from pydantic import Field

from clpeft.components.tta.adapting_strategy import AdaptingStrategy
from clpeft.components.tta.generalized_cross_entropy import generalized_cross_entropy
from clpeft.components.tta.options import AdaptationOptions
from clpeft.registry import register_strategy
from clpeft.schema import flat_options


@register_strategy("rpl")
class RPL(AdaptingStrategy):
    """RPL: generalized cross-entropy to the model's own pseudo-labels at test time (Rusak et al. 2022).

    Args:
        backbone: a feature extractor with normalisation layers.
        online: the test-time optimizer and the adapted parameters, written flat (``lr``, ``params``, ...).
        q: ``q`` of the generalized cross-entropy (0: cross-entropy, 1: mean absolute error).
    """

    @flat_options
    def __init__(self, backbone, online: AdaptationOptions = AdaptationOptions(), q: Annotated[float, Field(gt=0, le=1)] = 0.8):
        super().__init__(backbone, online)
        self.q = q

    def adapt(self, x: torch.Tensor) -> torch.Tensor:
        self.adaptation.begin_batch(self)
        logits = self.predict(x)
        self.adaptation.step(generalized_cross_entropy(logits, q=self.q).mean())
        return logits.detach()
