"""Imports the built-in backbones so that they register themselves."""

from clpeft.backbones import mlp, timm_backbone  # noqa: F401
