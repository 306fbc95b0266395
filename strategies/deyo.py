"""DeYO: destroy your object, entropy minimisation on samples whose prediction depends on shape.

Lee et al., "Entropy is not Enough for Test-Time Adaptation: From the Perspective of Disentangled
Factors", ICLR 2024 (https://arxiv.org/abs/2403.07366). On every test batch, with ``E_0 =
entropy_factor * ln C`` and the selection margin ``tau_Ent = margin_factor * ln C``:

1. entropy filter: keep ``x`` with ``H(x) < tau_Ent`` (eq. 7);
2. pseudo-label probability difference (eq. 5): ``PLPD(x) = p(y_hat | x) - p(y_hat | x')``, with
   ``y_hat`` the prediction on ``x`` and ``x'`` the object-destroyed image
   (:func:`destroy_objects`, patch shuffling by default; predicted without gradient, BatchNorm on
   the kept samples' statistics); keep ``PLPD > tau_PLPD``;
3. loss (eq. 8): the mean over the kept samples of ``alpha(x) H(x)``, ``alpha = exp(-(H(x) - E_0))
   + exp(PLPD(x))`` (each term dropped with its ``reweight_*`` switch; neither: plain entropy),
   one optimizer step; no step when no sample is kept.

The prediction returned is the one before the step. Adapted: the norm layers' affine parameters
below the top layers (:func:`lower_norm_layers`, as SAR). Defaults are the CIFAR-10-C settings
of Döbler et al.'s benchmark (``cfgs/cifar10_c/deyo.yaml`` over ``conf.py``: Adam lr 1e-3,
``tau_Ent`` ``0.5 ln C``, ``E_0`` ``0.4 ln C``, ``tau_PLPD`` 0.2, 4 x 4 patches); its ImageNet-C
setting is SGD lr 2.5e-4.

Paper symbols: ``tau_Ent / ln C`` -> ``margin_factor``, ``Ent_0 / ln C`` -> ``entropy_factor``,
``tau_PLPD`` -> ``plpd_threshold``.
"""

import math
from typing import Annotated

import torch
from pydantic import Field

from clpeft.components.tta.adapting_strategy import AdaptingStrategy
from clpeft.components.tta.losses import entropy
from clpeft.components.tta.lower_norm_layers import lower_norm_layers
from clpeft.components.tta.object_destruction import DestructionKind, destroy_objects
from clpeft.components.tta.online_adaptation import classifier
from clpeft.components.tta.options import AdaptationOptions
from clpeft.experience import Experience
from clpeft.registry import register_strategy
from clpeft.schema import flat_options


@register_strategy("deyo")
class DeYO(AdaptingStrategy):
    """DeYO: entropy minimisation on samples filtered and weighted by entropy and PLPD (Lee et al. 2024).

    Args:
        backbone: a feature extractor with normalisation layers.
        online: the test-time optimizer and the adapted parameters, written flat (``lr``, ...);
            ``params: norm`` adapts the norm layers below the top layers, ``all`` every weight and bias.
        margin_factor: ``tau_Ent = margin_factor * ln C``, the entropy filter.
        entropy_factor: ``E_0 = entropy_factor * ln C`` of the entropy weight.
        plpd_threshold: ``tau_PLPD``.
        reweight_entropy: weigh by ``exp(-(H - E_0))``.
        reweight_plpd: weigh by ``exp(PLPD)``.
        destruction: ``patch`` shuffling, ``pixel`` shuffling or ``occlusion``.
        patch_len: patches per side for ``patch``.
        occlusion_size, occlusion_row, occlusion_column: the window of ``occlusion`` (pixels).
    """

    @flat_options
    def __init__(
        self,
        backbone,
        online: AdaptationOptions = AdaptationOptions(),
        margin_factor: Annotated[float, Field(gt=0)] = 0.5,
        entropy_factor: Annotated[float, Field(gt=0)] = 0.4,
        plpd_threshold: float = 0.2,
        reweight_entropy: bool = True,
        reweight_plpd: bool = True,
        destruction: DestructionKind = "patch",
        patch_len: Annotated[int, Field(ge=1)] = 4,
        occlusion_size: Annotated[int, Field(ge=1)] = 112,
        occlusion_row: Annotated[int, Field(ge=0)] = 56,
        occlusion_column: Annotated[int, Field(ge=0)] = 56,
    ):
        super().__init__(backbone, online)
        self.margin_factor = margin_factor
        self.entropy_factor = entropy_factor
        self.plpd_threshold = plpd_threshold
        self.reweight = (float(reweight_entropy), float(reweight_plpd))
        self.destruction = {
            "kind": destruction,
            "patch_len": patch_len,
            "occlusion_size": occlusion_size,
            "occlusion_row": occlusion_row,
            "occlusion_column": occlusion_column,
        }

    def prepare_adaptation(self, exp: Experience) -> None:
        net = classifier(self.backbone, self.head)
        net.requires_grad_(False)
        self.adaptation.prepare(self, net if self.adaptation.params == "all" else lower_norm_layers(net))

    def adapt(self, x: torch.Tensor) -> torch.Tensor:
        self.adaptation.begin_batch(self)
        net = classifier(self.backbone, self.head)
        logits = net(x)
        log_classes = math.log(max(self.head.n_classes, 2))
        h = entropy(logits)
        kept = h < self.margin_factor * log_classes
        if not kept.any():
            return logits.detach()
        images = x[kept].float() / 255 if x.dtype == torch.uint8 else x[kept]
        with torch.no_grad():
            destroyed = net(destroy_objects(images.detach(), **self.destruction))
        probs = logits[kept].softmax(1)
        label = probs.argmax(1, keepdim=True)
        plpd = (probs.gather(1, label) - destroyed.softmax(1).gather(1, label)).view(-1)
        shape_dependent = plpd > self.plpd_threshold
        if not shape_dependent.any():
            return logits.detach()
        h, plpd = h[kept][shape_dependent], plpd[shape_dependent].detach()
        if any(self.reweight):
            h = h * (self.reweight[0] / torch.exp(h.detach() - self.entropy_factor * log_classes) + self.reweight[1] / torch.exp(-plpd))
        self.adaptation.step(h.mean(0))
        return logits.detach()
