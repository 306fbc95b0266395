"""The backbone interface every strategy sees.

A backbone turns a batch of *raw* inputs (``uint8`` images, flat vectors, or text) into
``(B, feature_dim)`` features. Input preprocessing (resize, normalisation) is part of the
backbone, so scenarios stay model-agnostic and the feature cache can key on the backbone's
identity alone.
"""

from __future__ import annotations

import hashlib
import json

import torch
from torch import nn


class Backbone(nn.Module):
    """Base class: ``forward(x) = forward_features(preprocess(x))``.

    Subclasses set ``feature_dim`` and implement :meth:`forward_features`; they override
    :meth:`preprocess` when raw inputs need work, and :meth:`describe` with the settings that
    change the features (used for the cache key).
    """

    feature_dim: int

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_features(self.preprocess(x))

    @property
    def frozen(self) -> bool:
        """True when no parameter is trainable."""
        return not any(p.requires_grad for p in self.parameters())

    def freeze(self) -> Backbone:
        for p in self.parameters():
            p.requires_grad_(False)
        return self.eval()

    def train(self, mode: bool = True) -> Backbone:
        # A frozen backbone stays in eval mode: its normalisation statistics must not drift.
        return super().train(mode and not (mode and self.frozen))

    def describe(self) -> dict:
        """The settings that determine the features (name, weights, input size, ...)."""
        return {"class": type(self).__name__}

    def identity(self) -> str:
        """A digest of :meth:`describe` and the current weights; it changes when they change."""
        h = hashlib.sha1(json.dumps(self.describe(), sort_keys=True, default=str).encode())
        for name, t in self.state_dict().items():
            h.update(name.encode())
            h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        return h.hexdigest()[:16]


class ImagePreprocess(nn.Module):
    """Raw images -> normalised model input, batched on the model's device.

    ``uint8`` inputs are scaled to [0, 1], floating inputs are assumed to be in [0, 1] already.
    Grayscale images are repeated to 3 channels, then resized (bilinear) to ``size`` and
    normalised with ``mean``/``std``.
    """

    def __init__(self, size: int, mean, std, channels: int = 3):
        super().__init__()
        self.size = int(size)
        self.channels = channels
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 3:
            x = x.unsqueeze(1)
        x = x.float() / 255.0 if x.dtype == torch.uint8 else x.float()
        if x.shape[1] == 1 and self.channels == 3:
            x = x.expand(-1, 3, -1, -1)
        if x.shape[-2:] != (self.size, self.size):
            x = nn.functional.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        return (x - self.mean) / self.std

    def extra_repr(self) -> str:
        return f"size={self.size}"
