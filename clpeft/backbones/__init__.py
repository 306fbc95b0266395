"""Backbones: pretrained feature extractors behind one interface (:class:`Backbone`).

Importing this package is cheap; :mod:`clpeft.backbones.builtin` (imported by the registry on
first use) imports every backbone module, registering ``timm`` (any timm model, packaged offline
weights, prompt and prefix injection for ViTs), ``mlp`` and ``cnn`` (trainable, for tests and
from-scratch baselines), ``text_encoder`` and ``causal_lm`` (transformers), which pulls in timm
and transformers.
"""

from clpeft.backbones.base import Backbone, ImagePreprocess

__all__ = ["Backbone", "ImagePreprocess"]
