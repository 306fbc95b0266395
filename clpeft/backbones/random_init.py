"""What the randomly initialised backbones (``cnn``, ``mlp``) share: an optional weights file, freezing, and its mention in ``describe``."""

from __future__ import annotations

from clpeft.backbones import weights_file
from clpeft.backbones.base import Backbone


class RandomInitBackbone(Backbone):
    """A backbone built with random weights that a ``weights`` file may replace (base class).

    A subclass builds its layers, then calls :meth:`load_weights`; its :meth:`describe` passes its
    settings through :meth:`with_weights`, so the feature cache tells loaded weights apart.
    """

    _weights: str | None = None

    def load_weights(self, weights: str | None, freeze: bool) -> None:
        """Load ``weights`` strictly (:func:`~clpeft.backbones.weights_file.load`) when given, then freeze if asked."""
        self._weights = weights
        if weights:
            weights_file.load(self, weights)
        if freeze:
            self.freeze()

    def with_weights(self, settings: dict) -> dict:
        """``settings`` plus the weights file, when one was loaded."""
        return {**settings, **({"weights": self._weights} if self._weights else {})}
