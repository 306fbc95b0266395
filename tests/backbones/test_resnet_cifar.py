"""``resnet18_cifar`` against Mammoth's ``backbone/ResNetBlock.py`` (``resnet18``, ``reduced-resnet18``).

Mammoth's network is built by its own code from ``shared/refs/mammoth`` (its ``backbone`` package stubbed: only the
registry decorator and the ``nn.Module`` base are used), its state dict without ``classifier.*`` is loaded strictly into
clpeft's backbone (the parameter names are Mammoth's), and both see the same images, normalised by Mammoth's way
(``ToTensor`` + ``Normalize(MEAN, STD)``) on Mammoth's side, raw ``uint8`` on clpeft's. Compared: the 512-d (160-d)
features in train mode (batch statistics), the gradients of a loss on them and the BatchNorm running statistics after
that pass, then the features in eval mode. Float32 on both sides, the same operations but the pooling (Mammoth's
``avg_pool2d`` over the 4x4 map, clpeft's mean): ``atol=1e-5`` (gradients, up to 300 in the stem: within ``1e-5`` of
each tensor's largest). Mutations checked to fail here: the stem without its
BatchNorm, a max-pool after it, the normalisation left out or with swapped mean and std.

The Seq-CIFAR-10 configs' ``train.augment`` and the backbone's normalisation are checked against the transforms of
Mammoth's ``datasets/seq_cifar10.py``, built by its own lines: the same images pixel for pixel under the same seed.

Without the reference files the comparisons skip in one line (the shared snapshot lacks Mammoth's ``backbone/`` and
``datasets/``); the rest, including the comparison with torchvision's ResNet-18 on Mammoth's stem, runs anywhere.
"""

from __future__ import annotations

import ast
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms as transforms
import yaml
from PIL import Image
from reference.conftest import load_reference, ref_dir, stub_module
from torch import nn
from torchvision.transforms import Normalize

import clpeft.config
from clpeft.augment import build_augment
from clpeft.backbones.resnet_cifar import CIFAR10_MEAN, CIFAR10_STD, ResNet18CIFAR
from clpeft.errors import UserError
from clpeft.registry import backbones

TOLERANCE = {"atol": 1e-5, "rtol": 0.0}
SHAPE = (3, 32, 32)
CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "baselines"


def _mammoth_file(relative: str):
    """``shared/refs/mammoth/<relative>``; skips when the reference lacks it (the shared snapshot holds Mammoth's
    ``models/`` and ``utils/`` only; the torchvision comparison below runs everywhere)."""
    path = ref_dir("mammoth") / relative
    if not path.is_file():
        pytest.skip(f"shared/refs/mammoth has no {relative} (add it from aimagelab/mammoth at the commit in SOURCES.tsv)")
    return path


def _mammoth_resnet(factory: str) -> nn.Module:
    """Mammoth's ``backbone.ResNetBlock.<factory>(num_classes=10)``, built by its own code."""
    folder = _mammoth_file("backbone/ResNetBlock.py").parent
    package = stub_module("backbone", __path__=[str(folder)], MammothBackbone=nn.Module, register_backbone=lambda name: lambda f: f)
    with load_reference("mammoth", "backbone.ResNetBlock", stubs={"backbone": package}) as ref:
        return getattr(ref, factory)(10)


def _pair(factory: str, num_filters: int, seed: int = 0) -> tuple[nn.Module, ResNet18CIFAR]:
    torch.manual_seed(seed)
    theirs = _mammoth_resnet(factory)
    mine = ResNet18CIFAR(SHAPE, num_filters=num_filters)
    mine.load_state_dict({k: v for k, v in theirs.state_dict().items() if not k.startswith("classifier.")}, strict=True)
    return theirs, mine


def _mammoth_input(x: torch.Tensor) -> torch.Tensor:
    """Mammoth's seq-cifar10 test transform on ``uint8`` images: ``ToTensor`` then ``Normalize(MEAN, STD)``."""
    return Normalize(CIFAR10_MEAN, CIFAR10_STD)(x.float() / 255.0)


@pytest.mark.parametrize("factory,num_filters", [("resnet18", 64), ("reduced_resnet18", 20)])
def test_features_gradients_and_statistics_equal_mammoths(factory, num_filters):
    theirs, mine = _pair(factory, num_filters)
    x = torch.randint(0, 256, (6, *SHAPE), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    weights = torch.randn(8 * num_filters, generator=torch.Generator().manual_seed(2))

    theirs.train(), mine.train()
    f_theirs, f_mine = theirs(_mammoth_input(x), returnt="features"), mine(x)
    assert f_mine.shape == (6, 8 * num_filters) == f_theirs.shape and mine.feature_dim == 8 * num_filters
    torch.testing.assert_close(f_mine, f_theirs, **TOLERANCE)
    (f_theirs @ weights).square().mean().backward()
    (f_mine @ weights).square().mean().backward()
    grads = {n: p.grad for n, p in theirs.named_parameters() if not n.startswith("classifier.")}
    assert grads.keys() == dict(mine.named_parameters()).keys()
    for name, p in mine.named_parameters():  # float32 sums in another order: within 1e-5 of the gradient's scale
        assert (p.grad - grads[name]).abs().max() <= 1e-5 * grads[name].abs().max(), name
    for name, buffer in mine.state_dict().items():
        torch.testing.assert_close(buffer, theirs.state_dict()[name], **TOLERANCE, msg=name)

    theirs.eval(), mine.eval()
    with torch.no_grad():
        torch.testing.assert_close(mine(x), theirs(_mammoth_input(x), returnt="features"), **TOLERANCE)
        # augmented training batches arrive as floats in [0, 1]
        torch.testing.assert_close(mine(x.float() / 255.0), mine(x), **TOLERANCE)


def test_features_equal_torchvisions_resnet18_with_mammoths_cifar_stem():
    """Runs without shared/refs: Mammoth's ResNet-18 is torchvision's with a 3x3 stride-1 stem and no
    max-pool (its shortcut is torchvision's ``downsample``); the weights map one to one in order."""
    import torchvision

    torch.manual_seed(0)
    reference = torchvision.models.resnet18()
    reference.conv1, reference.maxpool, reference.fc = nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.Identity(), nn.Identity()
    mine = ResNet18CIFAR(SHAPE)
    theirs = list(reference.state_dict().values())
    mine.load_state_dict(dict(zip(mine.state_dict(), theirs, strict=True)))
    x = torch.randint(0, 256, (4, *SHAPE), generator=torch.Generator().manual_seed(1), dtype=torch.uint8)
    for mode in (True, False):
        reference.train(mode), mine.train(mode)
        with torch.no_grad():
            torch.testing.assert_close(mine(x), reference(_mammoth_input(x)), **TOLERANCE)


def test_mammoth_state_dict_loads_as_weights_file(tmp_path):
    theirs, _ = _pair("resnet18", 64)
    backbone = {k: v for k, v in theirs.state_dict().items() if not k.startswith("classifier.")}
    torch.save(backbone, tmp_path / "mammoth_backbone.pt")
    loaded = ResNet18CIFAR(SHAPE, weights=str(tmp_path / "mammoth_backbone.pt")).eval()
    x = torch.randint(0, 256, (2, *SHAPE), generator=torch.Generator().manual_seed(3), dtype=torch.uint8)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), theirs.eval()(_mammoth_input(x), returnt="features"), **TOLERANCE)
    torch.save(theirs.state_dict(), tmp_path / "with_classifier.pt")  # strict: the classifier fills nothing here
    with pytest.raises(UserError, match="with_classifier.pt"):
        ResNet18CIFAR(SHAPE, weights=str(tmp_path / "with_classifier.pt"))


def _seq_cifar10() -> dict:
    """``MEAN, STD``, ``TRANSFORM`` and ``TEST_TRANSFORM`` of Mammoth's ``SequentialCIFAR10``, built by its own lines
    (only those assignments run, with torchvision's ``transforms``: the module itself needs Mammoth's data utilities)."""
    tree = ast.parse(_mammoth_file("datasets/seq_cifar10.py").read_text())
    (cls,) = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "SequentialCIFAR10"]
    wanted = {"(MEAN, STD)", "TRANSFORM", "TEST_TRANSFORM"}
    lines = [n for n in cls.body if isinstance(n, ast.Assign) and ast.unparse(n.targets[0]) in wanted]
    assert len(lines) == len(wanted)
    namespace = {"transforms": transforms}
    exec(compile(ast.Module(lines, type_ignores=[]), "seq_cifar10.py", "exec"), namespace)
    return namespace


def test_defaults_configs_and_augmentation_equal_mammoths_seq_cifar10_transforms():
    """The backbone's normalisation defaults are Mammoth's ``MEAN, STD``; the configs' ``train.augment`` followed by the
    backbone's normalisation gives, pixel for pixel, Mammoth's ``TRANSFORM`` of the same image under the same seed
    (torch draws the crop offsets and the flip in the same order), and raw images Mammoth's ``TEST_TRANSFORM``."""
    ref = _seq_cifar10()
    assert (list(ref["MEAN"]), list(ref["STD"])) == (CIFAR10_MEAN, CIFAR10_STD)
    recipes = {path.name: yaml.safe_load(path.read_text())["train"].get("augment") for path in sorted(CONFIGS.glob("cifar10_*.yaml"))}
    recipe = recipes["cifar10_derpp_buf200.yaml"]
    assert recipe == [{"name": "RandomCrop", "size": 32, "padding": 4}, {"name": "RandomHorizontalFlip"}]
    assert {n for n, r in recipes.items() if r != recipe} == {"cifar10_er_ace_buf200.yaml"}  # Mammoth's online setup: none
    augment, net = build_augment(recipe, 32), ResNet18CIFAR(SHAPE, num_filters=2)
    images = np.random.default_rng(0).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)
    images[:, :, :16] //= 3  # a left-right asymmetry, so a flip shows
    for k, image in enumerate(images):
        x = torch.from_numpy(image).permute(2, 0, 1)[None]
        torch.manual_seed(k)
        theirs = ref["TRANSFORM"](Image.fromarray(image))
        torch.manual_seed(k)
        torch.testing.assert_close(net.preprocess(augment(x))[0], theirs, atol=1e-6, rtol=0)
        torch.testing.assert_close(net.preprocess(x)[0], ref["TEST_TRANSFORM"](Image.fromarray(image)), atol=1e-6, rtol=0)


def test_registered_resolvable_and_shapes(digits_run):
    assert backbones.get("resnet18_cifar") is ResNet18CIFAR
    digits_run["backbone"] = {"name": "resnet18_cifar", "num_filters": 20}
    cfg = clpeft.config.resolve(digits_run)
    assert cfg.backbone.cls is ResNet18CIFAR and cfg.backbone.params["num_filters"] == 20
    torch.manual_seed(0)
    net = ResNet18CIFAR(SHAPE, num_filters=4).eval()
    seen = []
    for layer in (net.layer1, net.layer2, net.layer3, net.layer4):
        layer.register_forward_hook(lambda m, i, o: seen.append(tuple(o.shape[1:])))
    assert net(torch.zeros(2, *SHAPE, dtype=torch.uint8)).shape == (2, 32)
    assert seen == [(4, 32, 32), (8, 16, 16), (16, 8, 8), (32, 4, 4)]  # no max-pool: the stem keeps 32 x 32
    assert sum(isinstance(m, nn.BatchNorm2d) for m in net.modules()) == 1 + 2 * 8 + 3  # stem, blocks, three projections


def test_normalisation_by_hand_and_in_describe():
    net = ResNet18CIFAR((1, 8, 8), num_filters=2, mean=[0.5], std=[0.25])
    x = torch.tensor([0, 255], dtype=torch.uint8).view(2, 1, 1, 1).expand(2, 1, 8, 8)
    torch.testing.assert_close(net.preprocess(x)[:, 0, 0, 0], torch.tensor([-2.0, 2.0]))
    torch.testing.assert_close(net.preprocess(x[:, 0]), net.preprocess(x))  # (B, H, W) gets a channel axis
    assert net.describe()["mean"] == [0.5] and "mean" not in net.state_dict()  # a setting, not a weight


def test_identity_follows_the_normalisation():
    torch.manual_seed(0)
    a = ResNet18CIFAR(SHAPE, num_filters=2)
    b = ResNet18CIFAR(SHAPE, num_filters=2, std=[1.0, 1.0, 1.0])
    b.load_state_dict(a.state_dict())
    assert a.identity() != b.identity()


def test_bad_settings_are_user_errors():
    with pytest.raises(UserError, match="one value per image channel"):
        ResNet18CIFAR(SHAPE, mean=[0.5])
    with pytest.raises(UserError, match="images"):
        ResNet18CIFAR((64,))


def test_learns_a_separable_toy_task():
    """Trainable from scratch: the cross-entropy of bright vs dark images falls from ~0.7 below 0.05 in ten SGD steps."""
    torch.manual_seed(0)
    net = ResNet18CIFAR(SHAPE, num_filters=4)
    head = nn.Linear(net.feature_dim, 2)
    x = torch.cat([torch.randint(0, 100, (16, *SHAPE)), torch.randint(156, 256, (16, *SHAPE))]).to(torch.uint8)
    y = torch.arange(2).repeat_interleave(16)
    optimizer = torch.optim.SGD([*net.parameters(), *head.parameters()], lr=0.1)
    losses = []
    for _ in range(10):
        loss = F.cross_entropy(head(net(x)), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[0] > 0.5 and losses[-1] < 0.05
