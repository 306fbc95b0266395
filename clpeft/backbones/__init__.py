"""Backbones: pretrained feature extractors behind one interface (:class:`Backbone`).

Importing this package is cheap; :mod:`clpeft.backbones.builtin` (imported by the registry on
first use) registers ``timm`` and ``mlp``, which pulls in timm.
"""

from clpeft.backbones.base import Backbone, ImagePreprocess

__all__ = ["Backbone", "ImagePreprocess"]
