"""The backbone interface every strategy sees.

A backbone turns a batch of *raw* inputs (``uint8`` images, flat vectors, or text) into
``(B, feature_dim)`` features. Input preprocessing (resize, normalisation) is part of the
backbone, so scenarios stay model-agnostic and the feature cache can key on the backbone's
identity alone.
"""

from __future__ import annotations

import hashlib
import json
import math

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
        for name, value in self.state_dict().items():
            h.update(name.encode())
            if torch.is_tensor(value):
                h.update(value.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
            else:  # extra state (e.g. the digests of pretrained tensors a state dict leaves out)
                h.update(repr(value).encode())
        return h.hexdigest()[:16]


class ImagePreprocess(nn.Module):
    """Raw images -> normalised model input, batched on the model's device.

    ``uint8`` inputs are scaled to [0, 1], floating inputs are assumed to be in [0, 1] already.
    Grayscale images are repeated to 3 channels. Images of another size than ``size`` are
    resized: straight to ``size x size`` (bilinear), or with ``crop_pct`` as timm's and the
    official L2P/DualPrompt evaluation transforms do (``Resize(floor(size / crop_pct))``,
    bicubic, on the shorter side, then ``CenterCrop(size)``; ``crop_pct = 224 / 256`` is their
    ``Resize(256) + CenterCrop(224)``). Finally ``(x - mean) / std``; ``mean = 0, std = 1``
    feeds the [0, 1] image unnormalised.
    """

    def __init__(self, size: int, mean, std, channels: int = 3, crop_pct: float | None = None):
        super().__init__()
        self.size = int(size)
        self.channels = channels
        self.crop_pct = crop_pct
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 3:
            x = x.unsqueeze(1)
        was_uint8 = x.dtype == torch.uint8
        x = x.float() / 255.0 if was_uint8 else x.float()
        if x.shape[1] == 1 and self.channels == 3:
            x = x.expand(-1, 3, -1, -1)
        if x.shape[-2:] != (self.size, self.size):
            x = self._resize(x) if self.crop_pct is None else self._resize_center_crop(x, was_uint8)
        return (x - self.mean) / self.std

    def _resize(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)

    def _resize_center_crop(self, x: torch.Tensor, was_uint8: bool) -> torch.Tensor:
        """torchvision's ``Resize(floor(size / crop_pct), BICUBIC)`` + ``CenterCrop(size)``, on tensors.

        Sizes and crop offsets follow torchvision; PIL's bicubic kernel (a = -0.5) differs from
        torch's (a = -0.75) by a few grey levels at edges. Like PIL on ``uint8`` images, the result
        is clamped to [0, 1] (and rounded to 1/255 steps for ``uint8`` inputs).
        """
        short = math.floor(self.size / self.crop_pct)
        h, w = x.shape[-2:]
        size = (short, int(short * w / h)) if h <= w else (int(short * h / w), short)
        x = nn.functional.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=True).clamp_(0, 1)
        if was_uint8:
            x = x.mul_(255).round_().div_(255)
        top, left = round((size[0] - self.size) / 2), round((size[1] - self.size) / 2)
        return x[..., top : top + self.size, left : left + self.size]

    def extra_repr(self) -> str:
        return f"size={self.size}" + (f", crop_pct={self.crop_pct}" if self.crop_pct is not None else "")
