"""Reusable building blocks; each works alone and never imports the engine or strategies."""

from clpeft.components.heads import LinearHead
from clpeft.components.replay import ReplayBuffer

__all__ = ["LinearHead", "ReplayBuffer"]
