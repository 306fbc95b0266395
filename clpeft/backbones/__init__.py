"""Backbones: pretrained feature extractors behind one interface (:class:`Backbone`)."""

from clpeft.backbones.base import Backbone, ImagePreprocess
from clpeft.backbones import mlp, timm_backbone  # noqa: F401  (registers the built-ins)

__all__ = ["Backbone", "ImagePreprocess"]
