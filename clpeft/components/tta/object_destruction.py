"""DeYO's object-destroying transformations of an image batch.

Lee et al., "Entropy is not Enough for Test-Time Adaptation: From the Perspective of Disentangled
Factors", ICLR 2024 (https://arxiv.org/abs/2403.07366), section 3.2: a transformation that keeps
an image's low-level statistics but destroys the shape of its object, as the authors' code
(``methods/deyo.py`` of Döbler et al.'s benchmark) draws it:

* ``patch``: resize to ``L * floor(W / L)`` on both sides, cut into ``L x L`` patches, shuffle the
  patches of each image (``argsort`` of ``torch.rand(B, L * L)``), resize back to ``W x W``;
* ``pixel``: one random permutation (``torch.randperm(H W)``) of the pixel positions, the same
  for every image;
* ``occlusion``: a ``size x size`` window at (``row``, ``column``) filled with the image's
  per-channel mean.

Like the authors' code, ``patch`` and ``pixel`` assume square images (sizes from the width).
Resizing is bilinear with antialiasing (torchvision's ``Resize`` on tensors), skipped when the
size does not change.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F

DestructionKind = Literal["patch", "pixel", "occlusion"]


def destroy_objects(
    x: torch.Tensor,
    kind: DestructionKind = "patch",
    patch_len: int = 4,
    occlusion_size: int = 112,
    occlusion_row: int = 56,
    occlusion_column: int = 56,
) -> torch.Tensor:
    """The transformed copy of the float image batch ``x`` ``(B, C, H, W)`` (random draws from torch's generator)."""
    b, c, h, w = x.shape
    if kind == "occlusion":
        out = x.clone()
        mean = x.reshape(b, c, -1).mean(2)[..., None, None]
        window = out[:, :, occlusion_row : occlusion_row + occlusion_size, occlusion_column : occlusion_column + occlusion_size]
        window.copy_(mean.expand_as(window))
        return out
    if kind == "pixel":
        return x.reshape(b, c, -1)[:, :, torch.randperm(h * w)].reshape(b, c, w, w)
    side = (w // patch_len) * patch_len
    piece = side // patch_len
    resized = _resize(x, side)
    patches = resized.reshape(b, c, patch_len, piece, patch_len, piece).permute(0, 2, 4, 1, 3, 5)
    patches = patches.reshape(b, patch_len * patch_len, c, piece, piece)
    order = torch.argsort(torch.rand(b, patch_len * patch_len), dim=-1).to(x.device)
    shuffled = patches[torch.arange(b, device=x.device).unsqueeze(-1), order]
    shuffled = shuffled.reshape(b, patch_len, patch_len, c, piece, piece).permute(0, 3, 1, 4, 2, 5).reshape(b, c, side, side)
    return _resize(shuffled, w)


def _resize(x: torch.Tensor, size: int) -> torch.Tensor:
    if x.shape[-2:] == (size, size):
        return x
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
