"""Classifier heads that grow with the label space."""

from __future__ import annotations

import math

import torch
from torch import nn


class LinearHead(nn.Module):
    """A linear classifier whose output grows as new classes arrive.

    Old rows are kept exactly when the head grows; new rows get PyTorch's default
    ``nn.Linear`` initialisation. Loading a state dict resizes the head to the stored size,
    so a checkpoint taken after any experience loads into a freshly built strategy.

    Args:
        in_features: feature dimension.
        n_classes: initial number of outputs (usually 0: the first experience grows it).
    """

    def __init__(self, in_features: int, n_classes: int = 0):
        super().__init__()
        self.in_features = in_features
        self.weight = nn.Parameter(torch.empty(0, in_features))
        self.bias = nn.Parameter(torch.empty(0))
        self.grow_to(n_classes)

    @property
    def n_classes(self) -> int:
        return self.weight.shape[0]

    def grow_to(self, n_classes: int) -> None:
        """Add outputs up to ``n_classes``; a no-op when the head is already that large."""
        extra = n_classes - self.n_classes
        if extra <= 0:
            return
        new_w = torch.empty(extra, self.in_features, device=self.weight.device, dtype=self.weight.dtype)
        nn.init.kaiming_uniform_(new_w, a=math.sqrt(5))
        bound = 1.0 / math.sqrt(self.in_features) if self.in_features else 0.0
        new_b = torch.empty(extra, device=self.bias.device, dtype=self.bias.dtype).uniform_(-bound, bound)
        self.weight = nn.Parameter(torch.cat([self.weight.data, new_w]), requires_grad=self.weight.requires_grad)
        self.bias = nn.Parameter(torch.cat([self.bias.data, new_b]), requires_grad=self.bias.requires_grad)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(features, self.weight.to(features.dtype), self.bias.to(features.dtype))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        stored = state_dict.get(prefix + "weight")
        if stored is not None and stored.shape[0] != self.n_classes:
            self.weight = nn.Parameter(torch.empty_like(stored, device=self.weight.device), requires_grad=self.weight.requires_grad)
            self.bias = nn.Parameter(torch.empty(stored.shape[0], device=self.bias.device), requires_grad=self.bias.requires_grad)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, n_classes={self.n_classes}"
