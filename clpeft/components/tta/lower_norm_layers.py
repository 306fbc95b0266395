"""The normalisation layers SAR and DeYO adapt: every one but those of the network's top layers.

Niu et al., "Towards Stable Test-Time Adaptation in Dynamic Wild World", ICLR 2023
(https://arxiv.org/abs/2302.12400), section 5 ("we do not update the top layers"), and Lee et
al., "Entropy is not Enough for Test-Time Adaptation: From the Perspective of Disentangled
Factors", ICLR 2024 (https://arxiv.org/abs/2403.07366), which follows it. As the authors' code
(``collect_params`` of Döbler et al.'s benchmark, ``methods/sar.py`` and ``methods/deyo.py``),
a module is left out when its name contains ``layer4`` (a ResNet's last stage), ``blocks.9``,
``blocks.10``, ``blocks.11`` (ViT-Base's last three blocks) or ``norm.``, or is exactly ``norm``
(a bare timm ViT's final norm; inside ``classifier(backbone, head)``, as inside the benchmark's
wrapped models, that name never occurs, so the final norm adapts).
"""

from __future__ import annotations

from torch import nn

from clpeft.components.tta.online_adaptation import NORM_TYPES

TOP_LAYER_NAMES = ("layer4", "blocks.9", "blocks.10", "blocks.11", "norm.")


def lower_norm_layers(model: nn.Module) -> nn.ModuleList:
    """``model``'s BatchNorm/LayerNorm/GroupNorm layers outside its top layers, in module order."""
    return nn.ModuleList(
        m
        for name, m in model.named_modules()
        if isinstance(m, NORM_TYPES) and name != "norm" and not any(t in name for t in TOP_LAYER_NAMES)
    )
