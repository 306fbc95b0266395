"""Imports the built-in backbones so that they register themselves."""

from clpeft.backbones import mlp, text, timm_backbone  # noqa: F401
