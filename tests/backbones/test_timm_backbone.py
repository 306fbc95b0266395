"""The `timm` backbone: names with tags, weights from files, errors, preprocessing."""

from __future__ import annotations

import pytest
import timm
import torch

from clpeft.backbones.timm_backbone import TimmBackbone
from clpeft.errors import UserError


def test_tagged_name_and_weights_file_load_like_timm(tmp_path):
    torch.manual_seed(0)
    ref = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=16, num_classes=0)
    path = tmp_path / "w.pth"
    torch.save(ref.state_dict(), path)
    bb = TimmBackbone((1, 28, 28), model="vit_tiny_patch16_224.augreg_in21k", weights=str(path), img_size=32)
    x = torch.randint(0, 256, (2, 1, 28, 28), dtype=torch.uint8)
    with torch.no_grad():
        expected = ref.eval()(bb.preprocess(x))
        assert torch.equal(bb(x), expected)
    assert bb.frozen and bb.feature_dim == 192
    assert bb.preprocess(x).shape == (2, 3, 32, 32)


def test_unknown_model_and_mismatched_offline_weights():
    with pytest.raises(UserError, match="backbone.model: unknown timm model 'vit_tinny_patch16_224'; did you mean 'vit_tiny_patch16_224'"):
        TimmBackbone((1, 8, 8), model="vit_tinny_patch16_224")
    with pytest.raises(UserError, match="backbone.weights: 'efficientnet-lite0' holds weights for 'tf_efficientnet_lite0'"):
        TimmBackbone((1, 8, 8), model="resnet18", weights="efficientnet-lite0")


def test_identity_changes_with_weights():
    bb = TimmBackbone((1, 8, 8), model="vit_tiny_patch16_224", img_size=32)
    before = bb.identity()
    with torch.no_grad():
        next(bb.parameters()).add_(1.0)
    assert bb.identity() != before
