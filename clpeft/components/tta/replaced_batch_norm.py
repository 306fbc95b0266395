"""BatchNorm layers whose ``forward`` is replaced on the instance: the base of the test-time variants.

A forward hook would let each layer compute its own normalisation and then throw it away; instead
:meth:`ReplacedBatchNorm.attach` sets ``layer.forward`` to the variant's ``_normalise(layer, x)``, so
the layers keep their modules, parameters and ``state_dict`` keys (a reset to the source is a plain
``load_state_dict``), and :meth:`ReplacedBatchNorm.detach` gives them their own ``forward`` back.
"""

from __future__ import annotations

import functools

import torch
from torch.nn.modules.batchnorm import _BatchNorm


class ReplacedBatchNorm:
    """Base class: subclasses implement ``_normalise(layer, x)`` and may check the layers in ``_check``."""

    def __init__(self):
        self._layers: list[_BatchNorm] = []

    def attach(self, layers: list[_BatchNorm]) -> None:
        """Apply to ``layers`` from now on (eval mode; replaces a previous :meth:`attach`)."""
        self.detach()
        self._check(layers)
        for layer in layers:
            layer.eval()
            layer.forward = functools.partial(self._normalise, layer)
            self._layers.append(layer)

    def detach(self) -> None:
        """Give the layers of the last :meth:`attach` their own ``forward`` back."""
        for layer in self._layers:
            if getattr(layer.__dict__.get("forward"), "func", None) == self._normalise:
                del layer.forward
        self._layers = []

    def _check(self, layers: list[_BatchNorm]) -> None:
        """Refuse layers the variant cannot normalise (``ValueError``); all are fine by default."""

    def _normalise(self, layer: _BatchNorm, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError
