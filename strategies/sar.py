"""SAR: sharpness-aware and reliable entropy minimisation with model recovery.

Niu et al., "Towards Stable Test-Time Adaptation in Dynamic Wild World", ICLR 2023
(https://arxiv.org/abs/2302.12400). On every test batch, with ``E_0 = entropy_factor * ln C``:

1. reliable samples ``S(x) = 1[H(x) < E_0]`` (eq. 2);
2. a sharpness-aware step (eq. 4-5, :class:`SharpnessAwareOptimizer`) on the mean entropy of the
   reliable samples, the loss at the perturbed weights ``w + e`` taken over those of them that
   are still reliable there;
3. model recovery (section 4.2, :class:`SourceReset`): ``e_m <- 0.9 e_m + 0.1 L(w + e)`` (the
   first value itself; batches with no sample left do not count); when ``e_m < e_0`` the weights
   return to the source and ``e_m`` starts over. The base optimizer's momentum is kept, as in
   the authors' code (their SAM's ``load_state_dict`` restores only SAM's own state).

The prediction returned is the one before the step. The adapted parameters are the norm layers'
affine ``gamma``, ``beta`` below the top layers (:func:`lower_norm_layers`); BatchNorm normalises
with test-batch statistics. Defaults are the CIFAR-10-C settings of Döbler et al.'s benchmark
(``cfgs/cifar10_c/sar.yaml``: SGD with plain momentum 0.9, lr 1e-3, ``rho`` 0.05, ``E_0 = 0.4 ln
C``, ``e_0 = 0.2``); its ImageNet-C setting is ``lr: 0.00025`` (its code forces lr 1e-3 for ViT
and Swin models; clpeft takes the configured ``lr``).

Paper symbols: ``E_0 / ln C`` -> ``entropy_factor``, ``rho`` -> ``rho``, ``e_0`` -> ``reset_constant``.
"""

import math
from typing import Annotated

import torch
from pydantic import Field

from clpeft.components.tta.adapting_strategy import AdaptingStrategy
from clpeft.components.tta.losses import entropy
from clpeft.components.tta.lower_norm_layers import lower_norm_layers
from clpeft.components.tta.online_adaptation import classifier
from clpeft.components.tta.options import AdaptationOptions
from clpeft.components.tta.reliable_entropy import entropy_margin
from clpeft.components.tta.sharpness_aware import SharpnessAwareOptimizer
from clpeft.components.tta.source_reset import SourceReset
from clpeft.experience import Experience
from clpeft.registry import register_strategy
from clpeft.schema import flat_options

EMA_DECAY = 0.9  # of the recovery criterion e_m (the authors' code)


@register_strategy("sar")
class SAR(AdaptingStrategy):
    """SAR: sharpness-aware entropy minimisation on reliable samples with model recovery (Niu et al. 2023).

    Args:
        backbone: a feature extractor with normalisation layers.
        online: the base optimizer of SAM and the adapted parameters, written flat (``lr``, ...);
            ``params: norm`` adapts the norm layers below the top layers, ``all`` every weight and bias.
        entropy_factor: ``E_0 = entropy_factor * ln C``, the reliability margin.
        rho: radius of SAM's weight perturbation.
        reset_constant: ``e_0``; the model recovers when the moving average of the loss falls below it.
    """

    @flat_options
    def __init__(
        self,
        backbone,
        online: AdaptationOptions = AdaptationOptions(optimizer="sgd"),
        entropy_factor: Annotated[float, Field(gt=0)] = 0.4,
        rho: Annotated[float, Field(ge=0)] = 0.05,
        reset_constant: Annotated[float, Field(ge=0)] = 0.2,
    ):
        super().__init__(backbone, online)
        self.entropy_factor = entropy_factor
        self.reset_constant = reset_constant
        self.margin = 0.0
        self.adaptation.optimizer = SharpnessAwareOptimizer(online.optimizer, online.lr, online.momentum, online.weight_decay, rho)
        self.recovery = SourceReset(classifier(backbone, self.head))
        self.register_buffer("loss_ema", torch.tensor(math.nan, dtype=torch.float64))  # e_m; nan: none yet

    def before_experience(self, exp: Experience) -> None:
        super().before_experience(exp)
        self.margin = entropy_margin(self.entropy_factor, self.head.n_classes)

    def prepare_adaptation(self, exp: Experience) -> None:
        net = classifier(self.backbone, self.head)
        net.requires_grad_(False)
        adapted = net if self.adaptation.params == "all" else lower_norm_layers(net)
        self.adaptation.prepare(self, adapted, on_start=lambda: self.recovery.capture(net))

    def adapt(self, x: torch.Tensor) -> torch.Tensor:
        self.adaptation.begin_batch(self)
        z = self.backbone.preprocess(x)  # once for both passes
        prediction, reliable = self._ascend(z)
        h2 = entropy(self._logits(z))[reliable]
        loss = float(self.adaptation.optimizer.descend(h2[h2 < self.margin].mean(0)))  # L(w + e); nan: no sample left
        ema = float(self.loss_ema)
        if not math.isnan(loss):
            ema = loss if math.isnan(ema) else EMA_DECAY * ema + (1 - EMA_DECAY) * loss
        if ema < self.reset_constant:
            self.recovery.restore(classifier(self.backbone, self.head))  # SGD's momentum survives, as in the authors' code
            ema = math.nan
        self.loss_ema.fill_(ema)
        return prediction

    def _logits(self, z: torch.Tensor) -> torch.Tensor:
        """The classifier on preprocessed inputs (a backbone's forward is ``forward_features(preprocess(x))``)."""
        return self.head(self.backbone.forward_features(z))

    def _ascend(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The pass at ``w``: SAM's ascent on the reliable samples' mean entropy (eq. 2, 4); returns
        the prediction and the reliable samples. Its graph and tensors end here, before the pass at ``w + e``."""
        logits = self._logits(z)
        h = entropy(logits)
        reliable = h < self.margin
        self.adaptation.optimizer.ascend(h[reliable].mean(0))
        return logits.detach(), reliable
