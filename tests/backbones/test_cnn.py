"""The small BatchNorm CNN backbone: registration, input handling, shapes, and that it learns."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

import clpeft.config
from clpeft.backbones.cnn import CNNBackbone
from clpeft.components.heads.classifiers import LinearHead
from clpeft.errors import UserError
from clpeft.registry import backbones


def test_registered_and_resolvable_from_a_config(digits_run):
    assert backbones.get("cnn") is CNNBackbone
    digits_run["backbone"] = {"name": "cnn", "widths": [8, 16], "blocks": 2}
    cfg = clpeft.config.resolve(digits_run)
    assert cfg.backbone.cls is CNNBackbone and cfg.backbone.params["widths"] == [8, 16]


def test_features_shape_downsampling_and_batchnorm_count():
    torch.manual_seed(0)
    net = CNNBackbone((1, 28, 28), widths=[8, 16, 32], blocks=2).eval()
    feats = net(torch.zeros(3, 1, 28, 28, dtype=torch.uint8))
    assert feats.shape == (3, 32) and net.feature_dim == 32
    seen = []
    for block in net.stages:
        block.register_forward_hook(lambda m, i, o: seen.append(tuple(o.shape[1:])))
    net(torch.zeros(1, 1, 28, 28, dtype=torch.uint8))
    assert seen == [(8, 28, 28), (8, 28, 28), (16, 14, 14), (16, 14, 14), (32, 7, 7), (32, 7, 7)]
    n_bn = sum(isinstance(m, torch.nn.BatchNorm2d) for m in net.modules())
    assert n_bn == 1 + 2 * 6 + 2  # stem, two per block, projection shortcuts of the two down-sampling blocks


def test_uint8_inputs_are_scaled_and_float_inputs_taken_in_unit_range():
    torch.manual_seed(0)
    net = CNNBackbone((1, 8, 8), widths=[4]).eval()
    x = torch.randint(0, 256, (5, 1, 8, 8), dtype=torch.uint8)
    torch.testing.assert_close(net(x), net(x.float() / 255))
    torch.testing.assert_close(net(x), net(x[:, 0]))  # (B, H, W) gets a channel axis
    rgb = CNNBackbone((3, 8, 8), widths=[4])
    assert rgb.stem[0].in_channels == 3


def test_bad_settings_are_user_errors():
    with pytest.raises(UserError):
        CNNBackbone((1, 8, 8), widths=[])
    with pytest.raises(UserError):
        CNNBackbone((64,), widths=[4])
    with pytest.raises(UserError):
        CNNBackbone((1, 8, 8), blocks=0)


def test_learns_digits_well_above_chance_in_a_few_epochs():
    torch.manual_seed(0)
    d = load_digits()
    x = torch.from_numpy((d.images * 255 / 16).round().astype("uint8")).unsqueeze(1)
    y = torch.from_numpy(d.target)
    net = CNNBackbone((1, 8, 8), widths=[16, 32])
    head = LinearHead(net.feature_dim, 10)
    params = [*net.parameters(), *head.parameters()]
    opt = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    for _ in range(6):
        net.train()
        perm = torch.randperm(1400)
        for i in range(0, 1400, 64):
            idx = perm[i : i + 64]
            loss = F.cross_entropy(head(net(x[idx])), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    net.eval()
    with torch.no_grad():
        acc = (head(net(x[1400:])).argmax(1) == y[1400:]).float().mean().item()
    assert acc > 0.85
    assert net.identity() != CNNBackbone((1, 8, 8), widths=[16, 32]).identity()
