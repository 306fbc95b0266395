"""clpeft's SAR, RDumb, DeYO, MEMO, bn_adapt's prior and EMA statistics and the Dirichlet label shift against Döbler et al.'s benchmark (mariodoebler/test-time-adaptation).

The benchmark's ``classification/methods/{sar,eata,deyo,memo,norm}.py`` (RDumb is its EATA with
``cfgs/<dataset>/rdumb.yaml``: no Fisher term, ``MODEL.RESET_AFTER_NUM_UPDATES``) run next to
clpeft's strategies on the tiny networks, weights, batches and configs of
``test_tta_methods.py`` (whose helpers this file uses): a BatchNorm CNN and timm's ``test_vit``
with LayerNorm, 3 x 32 x 32 images, ``cfgs/cifar10_c/<method>.yaml`` over ``conf.py``. Random
draws (DeYO's patch order) are made identical by seeding torch's generator before each batch on
both sides.

Compared after every batch: the prediction, and the method's state (SAR's moving loss ``e_m``,
EATA's moving probability vector); after the last batch every parameter and the optimizer state.
Tolerances are those of ``test_tta_methods.py`` (``CLOSE``, Adam's float noise bounded by
``NOISE``). Mutations checked once are named in each test's docstring.
"""

from __future__ import annotations

import copy
import importlib
import importlib.util
import inspect
import math
import types

import pytest
import torch
from torch import nn

from clpeft.components.tta.augmix import AugMix
from clpeft.components.tta.lower_norm_layers import lower_norm_layers
from clpeft.components.tta.object_destruction import destroy_objects
from clpeft.components.tta.online_adaptation import classifier
from clpeft.components.tta.prior_batch_norm import PriorBatchNorm
from clpeft.registry import strategies
from clpeft.scenarios.label_shift import dirichlet_order

from .conftest import ref_dir, stub_module
from .test_tta_methods import (
    BATCH,
    CLASSES,
    CLOSE,
    SUBDIR,
    _adapt,
    _assert_same_optimizer_state,
    _assert_same_parameters,
    _cfg,
    _clpeft,
    _float,
    _images,
    _named,
    _package,
    _params,
    _reference_model,
    _source_model,
)

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")


@pytest.fixture
def bench(load_reference):
    """The benchmark's ``conf``, the methods ``sar``, ``eata``, ``deyo``, ``memo``, ``norm`` and its AugMix (stubs as in
    ``test_tta_methods.py``; EATA without a Fisher term never asks for source data)."""
    root = ref_dir("test-time-adaptation") / SUBDIR
    pytest.importorskip("yacs", reason="the benchmark's configs need yacs (pip install -e .[dev])")
    stubs = {
        "methods": _package("methods", root / "methods"),
        "utils": _package("utils", root / "utils"),
        "augmentations": _package("augmentations", root / "augmentations"),
        "models": _package("models"),
        "models.model": stub_module("models.model", ResNetDomainNet126=type("ResNetDomainNet126", (), {})),
        "datasets": _package("datasets"),
        "datasets.data_loading": stub_module("datasets.data_loading", get_source_loader=None),
        "iopath": _package("iopath"),
        "iopath.common": _package("iopath.common"),
        "iopath.common.file_io": stub_module("iopath.common.file_io", g_pathmgr=None),
    }
    with load_reference("test-time-adaptation", "conf", SUBDIR, stubs=stubs) as conf:
        ns = types.SimpleNamespace(root=root, conf=conf)
        for name in ("sar", "eata", "memo", "norm", "rotta"):
            setattr(ns, name, importlib.import_module(f"methods.{name}"))
        ns.augmix = importlib.import_module("augmentations.transforms_augmix")
        ns.deyo = importlib.import_module("methods.deyo") if importlib.util.find_spec("einops") else None
        yield ns


def _defaults(name: str) -> dict:
    signature = inspect.signature(strategies.get(name).__init__)
    return {k: p.default for k, p in signature.parameters.items() if p.default is not inspect.Parameter.empty}


def _run(strategy, ref, seeds, images) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Both sides on the same batches, torch's generator seeded alike before each."""
    outputs = []
    for seed, x in zip(seeds, images):
        torch.manual_seed(seed)
        ours = _adapt(strategy, x)
        torch.manual_seed(seed)
        outputs.append((ours, ref(_float(x))))
    return outputs


def _assert_same_end_state(strategy, ref, model) -> None:
    """Parameters (moved from the source alike) and optimizer state (SAM's: its base SGD's)."""
    ours, theirs = _named(strategy), dict(ref.model.named_parameters())
    _assert_same_parameters(ours, theirs, _params(model))
    optimizer = getattr(ref.optimizer, "base_optimizer", ref.optimizer)
    _assert_same_optimizer_state(strategy.adaptation.optimizer._optimizer, ours, optimizer, theirs)


# ------------------------------------------------------------------ defaults


def test_defaults_are_the_cifar10_c_configs(bench):
    """SAR, RDumb, DeYO, MEMO and RoTTA's defaults are ``cfgs/cifar10_c/<method>.yaml`` over ``conf.py`` (SAR's
    optimizer: its code's SGD with ``OPTIM.MOMENTUM``, whatever ``OPTIM.METHOD`` says)."""
    sar, rdumb, deyo = (_cfg(bench, m) for m in ("sar", "rdumb", "deyo"))
    assert _defaults("sar") == {
        "optimizer": "sgd",
        "lr": sar.OPTIM.LR,
        "momentum": sar.OPTIM.MOMENTUM,
        "weight_decay": 0.0,
        "params": "norm",
        "entropy_factor": sar.EATA.MARGIN_E0,
        "reset_constant": sar.SAR.RESET_CONSTANT_EM,
        "rho": 0.05,
    }
    assert inspect.signature(bench.sar.SAM.__init__).parameters["rho"].default == 0.05
    assert rdumb.MODEL.ADAPTATION == "eata" and rdumb.EATA.FISHER_ALPHA == 0.0
    assert _defaults("rdumb") == {
        "optimizer": "adam",
        "lr": rdumb.OPTIM.LR,
        "momentum": rdumb.OPTIM.BETA,
        "weight_decay": rdumb.OPTIM.WD,
        "params": "norm",
        "entropy_factor": rdumb.EATA.MARGIN_E0,
        "redundancy_margin": rdumb.EATA.D_MARGIN,
        "reset_every": rdumb.MODEL.RESET_AFTER_NUM_UPDATES,
    }
    assert _defaults("deyo") == {
        "optimizer": "adam",
        "lr": deyo.OPTIM.LR,
        "momentum": deyo.OPTIM.BETA,
        "weight_decay": deyo.OPTIM.WD,
        "params": "norm",
        "margin_factor": deyo.DEYO.MARGIN,
        "entropy_factor": deyo.EATA.MARGIN_E0,
        "plpd_threshold": deyo.DEYO.PLPD,
        "reweight_entropy": deyo.DEYO.REWEIGHT_ENT,
        "reweight_plpd": deyo.DEYO.REWEIGHT_PLPD,
        "destruction": "patch",
        "patch_len": deyo.DEYO.PATCH_LEN,
        "occlusion_size": deyo.DEYO.OCCLUSION_SIZE,
        "occlusion_row": deyo.DEYO.ROW_START,
        "occlusion_column": deyo.DEYO.COLUMN_START,
    }
    assert deyo.DEYO.AUG_TYPE == "patch"
    memo, rotta = _cfg(bench, "memo"), _cfg(bench, "rotta")
    assert _defaults("memo") == {
        "optimizer": memo.OPTIM.METHOD.lower(),
        "lr": memo.OPTIM.LR,
        "momentum": memo.OPTIM.MOMENTUM,
        "weight_decay": memo.OPTIM.WD,
        "params": "all",
        "n_augmentations": memo.TEST.N_AUGMENTATIONS,
        "alpha": memo.BN.ALPHA,
        "preaugment": "crop",
        "severity": 1.0,
    }
    assert memo.MODEL.EPISODIC and memo.OPTIM.NESTEROV and memo.OPTIM.DAMPENING == 0.0
    assert _defaults("rotta") == {
        "optimizer": "adam",
        "lr": rotta.OPTIM.LR,
        "momentum": rotta.OPTIM.BETA,
        "weight_decay": rotta.OPTIM.WD,
        "params": "norm",
        "memory_size": rotta.ROTTA.MEMORY_SIZE,
        "update_frequency": rotta.ROTTA.UPDATE_FREQUENCY,
        "nu": rotta.ROTTA.NU,
        "alpha": rotta.ROTTA.ALPHA,
        "lambda_t": rotta.ROTTA.LAMBDA_T,
        "lambda_u": rotta.ROTTA.LAMBDA_U,
        "flip": 0.5,
    }
    for cfg in (sar, rdumb, deyo, rotta):
        assert cfg.OPTIM.STEPS == 1 and not cfg.MODEL.EPISODIC and cfg.TEST.WINDOW_LENGTH == 1


# ------------------------------------------------------------------ sar


@pytest.mark.parametrize(("kind", "head_scale", "recovers"), [("cnn", 6.0, False), ("vit", 6.0, False), ("cnn", 12.0, True)])
def test_sar_equals_the_reference(bench, kind, head_scale, recovers):
    """Four batches with the CIFAR-10-C config: the pre-update predictions, the moving loss
    ``e_m`` after each batch, the parameters and SGD's momentum buffers. A sharper head makes the
    loss fall below ``e_0 = 0.2``: model and optimizer recover to the source (checked: equal to
    the source right after) and ``e_m`` starts over, while SGD keeps its momentum (the reference's
    SAM restores only its own state). Mutations checked: the second loss not re-filtered,
    Nesterov momentum, ``rho`` 0.1, the EMA's first value 0 instead of the loss, momentum cleared
    at recovery."""
    model = _source_model(kind, head_scale)
    strategy = _clpeft("sar", kind, model)
    ref = bench.sar.SAR(_cfg(bench, "sar"), _reference_model(model), CLASSES)
    assert math.isclose(strategy.margin, ref.margin_e0)
    recoveries = 0
    for i in range(4):
        x = _images(BATCH, 110 + i)
        torch.testing.assert_close(_adapt(strategy, x), ref(_float(x)), **CLOSE)
        if ref.ema is None:
            assert torch.isnan(strategy.loss_ema)
            recoveries += 1
            assert all(torch.equal(p, _params(model)[n]) for n, p in _named(strategy).items())
        else:
            assert strategy.loss_ema.item() == pytest.approx(ref.ema, rel=1e-5)
    assert (recoveries > 0) == recovers
    ours, theirs = _named(strategy), dict(ref.model.named_parameters())
    _assert_same_parameters(ours, theirs, None if recovers else _params(model))
    _assert_same_optimizer_state(strategy.adaptation.optimizer._optimizer, ours, ref.optimizer.base_optimizer, theirs)


def test_sar_adapts_the_norm_layers_below_the_top_layers(bench):
    """On a ViT grown to 12 blocks (module names ``blocks.9`` .. ``blocks.11``), the layers SAR and
    DeYO adapt are exactly the reference's ``collect_params``, in order. Mutation checked:
    ``blocks.1`` instead of ``blocks.10`` (drops blocks 1 and 10 .. 19)."""
    model = _source_model("vit")
    blocks = model[0].net.blocks
    while len(blocks) < 12:
        blocks.append(type(blocks[0])(dim=blocks[0].norm1.normalized_shape[0], num_heads=blocks[0].attn.num_heads))
    names = {id(p): n for n, p in model.named_parameters()}
    ours = [names[id(p)] for m in lower_norm_layers(model) for p in (m.weight, m.bias)]
    ref = bench.sar.SAR(_cfg(bench, "sar"), _reference_model(model), CLASSES)
    _, theirs = ref.collect_params()
    assert ours == theirs and not any(".blocks.9." in n or ".blocks.11." in n for n in ours)
    assert any(".blocks.8." in n for n in ours) and "0.net.norm.weight" in ours


# ------------------------------------------------------------------ rdumb


@pytest.mark.parametrize("kind", ["cnn", "vit"])
def test_rdumb_equals_the_references_eata_with_resets(bench, kind):
    """``cfgs/cifar10_c/rdumb.yaml`` with resets every 2 updates, five batches: predictions,
    EATA's moving probability vector (cleared at each reset), parameters (the source right after
    a reset) and Adam's state after the last. Mutations checked: counting only batches with a
    step, keeping the probability vector over a reset, keeping Adam's moments."""
    model = _source_model(kind, head_scale=60.0, centred=True)
    strategy = _clpeft("rdumb", kind, model, reset_every=2)
    ref = bench.eata.EATA(_cfg(bench, "rdumb", **{"MODEL.RESET_AFTER_NUM_UPDATES": 2}), _reference_model(model), CLASSES)
    steps = 0
    for i in range(5):
        x = _images(BATCH, 120 + i)
        torch.testing.assert_close(_adapt(strategy, x), ref(_float(x)), **CLOSE)
        if ref.current_model_probs is None:
            assert strategy.filter.moving_probs is None
            assert all(torch.equal(p, _params(model)[n]) for n, p in _named(strategy).items())
        else:
            torch.testing.assert_close(strategy.filter.moving_probs, ref.current_model_probs, **CLOSE)
        steps += int(ref.optimizer.state != {})
    assert int(strategy.steps) == 5 and steps >= 1
    _assert_same_end_state(strategy, ref, model)


# ------------------------------------------------------------------ deyo


def test_object_destruction_equals_the_references_transformations(bench):
    """Patch shuffling (divisible and not: bilinear antialiased resizes), pixel shuffling and the
    occlusion window of the reference's ``DeYO.loss_calculation``, seeded alike: equal images.
    Mutations checked: patches permuted row-major instead of column-major, one order per batch."""
    if bench.deyo is None:
        pytest.skip("the reference's DeYO needs einops")
    import torchvision
    from einops import rearrange

    def reference(x, kind, patch_len=4, size=8, row=4, column=6):  # the reference's lines, outside its loss
        if kind == "occ":
            mean = x.view(x.shape[0], x.shape[1], -1).mean(dim=2).unsqueeze(-1).unsqueeze(-1)
            x = x.clone()
            x[:, :, row : row + size, column : column + size] = mean.expand(-1, -1, size, size)
            return x
        if kind == "pixel":
            x = rearrange(x, "b c h w -> b c (h w)")[:, :, torch.randperm(x.shape[-1] * x.shape[-2])]
            return rearrange(x, "b c (ps1 ps2) -> b c ps1 ps2", ps1=x.shape[-1] and int(math.sqrt(x.shape[-1])))
        side = (x.shape[-1] // patch_len) * patch_len
        x = torchvision.transforms.Resize((side, side))(x)
        x = rearrange(x, "b c (ps1 h) (ps2 w) -> b (ps1 ps2) c h w", ps1=patch_len, ps2=patch_len)
        perm = torch.argsort(torch.rand(x.shape[0], x.shape[1]), dim=-1)
        x = x[torch.arange(x.shape[0]).unsqueeze(-1), perm]
        x = rearrange(x, "b (ps1 ps2) c h w -> b c (ps1 h) (ps2 w)", ps1=patch_len, ps2=patch_len)
        return torchvision.transforms.Resize((x.shape[-1] * 0 + original, original))(x)

    source = inspect.getsource(bench.deyo.DeYO.loss_calculation)
    assert "torch.rand(x_prime.shape[0], x_prime.shape[1])" in source and "torch.randperm(x_prime.shape[-1])" in source
    for original, patch_len in [(32, 4), (30, 4), (28, 3)]:
        x = torch.rand(5, 3, original, original, generator=torch.Generator().manual_seed(original))
        torch.manual_seed(1)
        expected = reference(x, "patch", patch_len)
        torch.manual_seed(1)
        torch.testing.assert_close(destroy_objects(x, "patch", patch_len), expected, rtol=0, atol=1e-6)
    x = torch.rand(5, 3, 32, 32, generator=torch.Generator().manual_seed(3))
    torch.manual_seed(2)
    expected = reference(x, "pixel")
    torch.manual_seed(2)
    assert torch.equal(destroy_objects(x, "pixel"), expected)
    got = destroy_objects(x, "occlusion", occlusion_size=8, occlusion_row=4, occlusion_column=6)
    torch.testing.assert_close(got, reference(x, "occ"), rtol=0, atol=1e-7)


@pytest.mark.parametrize(
    ("kind", "options"),
    [
        ("cnn", {}),
        ("vit", {}),
        ("cnn", {"DEYO.AUG_TYPE": "pixel", "DEYO.REWEIGHT_ENT": False}),
        (
            "cnn",
            {"DEYO.AUG_TYPE": "occ", "DEYO.OCCLUSION_SIZE": 16, "DEYO.ROW_START": 8, "DEYO.COLUMN_START": 4, "DEYO.REWEIGHT_PLPD": False},
        ),
    ],
)
def test_deyo_equals_the_reference(bench, monkeypatch, kind, options):
    """Four batches with the CIFAR-10-C config (and the pixel and occlusion transformations, each
    weight switched off once): predictions, parameters and Adam's state; some samples, not all,
    pass the entropy filter, and some of them the PLPD filter (on the CNN: 6 and 4 of the first batch). Mutations checked: PLPD from the destroyed image's
    own prediction, the entropy weight without ``E_0``, ``tau_Ent`` ``0.4 ln C``, BatchNorm of the
    destroyed images on the whole batch."""
    if bench.deyo is None:
        pytest.skip("the reference's DeYO needs einops")
    aug = {"patch": "patch", "pixel": "pixel", "occ": "occlusion"}
    cfg = _cfg(bench, "deyo", **options)
    params = {
        "destruction": aug[cfg.DEYO.AUG_TYPE],
        "reweight_entropy": cfg.DEYO.REWEIGHT_ENT,
        "reweight_plpd": cfg.DEYO.REWEIGHT_PLPD,
        "occlusion_size": cfg.DEYO.OCCLUSION_SIZE,
        "occlusion_row": cfg.DEYO.ROW_START,
        "occlusion_column": cfg.DEYO.COLUMN_START,
    }
    model = _source_model(kind, head_scale=16.0, centred=True) if kind == "cnn" else _source_model(kind, head_scale=8.0)
    strategy = _clpeft("deyo", kind, model, **params)
    ref = bench.deyo.DeYO(cfg, _reference_model(model), CLASSES)
    kept = []  # samples past the entropy filter, per batch
    monkeypatch.setitem(
        type(strategy).adapt.__globals__, "destroy_objects", lambda x, **kw: (kept.append(len(x)), destroy_objects(x, **kw))[1]
    )
    for ours, theirs in _run(strategy, ref, range(130, 134), [_images(BATCH, 130 + i) for i in range(4)]):
        torch.testing.assert_close(ours, theirs, **CLOSE)
    assert len(kept) == 4 and 0 < sum(kept) < 4 * BATCH, kept
    _assert_same_end_state(strategy, ref, model)


# ------------------------------------------------------------------ memo


def _pil(image: torch.Tensor):
    from torchvision.transforms import functional

    return functional.to_pil_image(image)


@pytest.mark.parametrize(
    ("channels", "size", "preaugment", "severity"),
    [
        (3, 32, "crop", 1),
        (1, 32, "crop", 1),
        (1, 28, "resized_crop", 1),
        (3, 24, "resized_crop", 1),
        (3, 32, "crop", 3),
    ],
)
def test_augmix_views_equal_the_references_augmenter(bench, channels, size, preaugment, severity):
    """Seeded alike (torch's generator for the pre-augmentation, numpy's for the chains), the views
    of ``AugMix`` equal ``AugMixAugmenter``'s (``cifar10_c`` at 32 pixels: pad-and-crop; other
    sizes: random resized crop; severity 1, MEMO's, and 3), the image itself first; both leave
    numpy's generator in the same state. Mutations checked: translate by ``size / 4``, chains of 1-4 operations, the mix weight
    ``m`` on the chains instead of the original."""
    import numpy as np
    from torchvision import transforms

    g = torch.Generator().manual_seed(size)
    image = (torch.rand(channels, size, size, generator=g) * 255).round().to(torch.uint8)
    name = "cifar10_c" if preaugment == "crop" and size == 32 else "imagenet_c"
    augmenter = bench.augmix.AugMixAugmenter(None, transforms.ToTensor(), name, n_views=6, use_augmix=True, severity=severity)
    augmenter.img_size = size
    torch.manual_seed(4)
    np.random.seed(4)
    expected = torch.stack(augmenter(_pil(image[0] if channels == 1 else image)))
    after = np.random.uniform()
    torch.manual_seed(4)
    augmix = AugMix(preaugment, severity)
    augmix.seed(4)
    got = augmix.views(image, 6)
    assert augmix.rng.uniform() == after
    torch.testing.assert_close(got, expected.view_as(got), rtol=0, atol=1e-6)


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_prior_batch_norm_equals_alpha_batch_norm(bench, alpha):
    """``PriorBatchNorm`` on a BatchNorm layer with source statistics equals the reference's
    ``AlphaBatchNorm`` wrapping it (outputs and input gradients), on few values per channel
    (3 x 3 pixels of one image: the unbiased variance matters). Mutation checked: the biased variance."""
    torch.manual_seed(0)
    layer = nn.BatchNorm2d(4)
    with torch.no_grad():
        layer.running_mean.uniform_(-1, 1)
        layer.running_var.uniform_(0.5, 2)
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.uniform_(-0.5, 0.5)
    reference = importlib.import_module("methods.bn").AlphaBatchNorm(copy.deepcopy(layer), alpha)
    PriorBatchNorm(alpha).attach([layer])
    for shape in [(1, 4, 3, 3), (5, 4, 2, 2)]:
        x = torch.randn(shape, requires_grad=True)
        ours, theirs = layer(x), reference(x)
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)
        g = torch.randn(shape)
        torch.testing.assert_close(torch.autograd.grad(ours, x, g)[0], torch.autograd.grad(theirs, x, g)[0], rtol=1e-6, atol=1e-6)


def _memo_views(bench, image: torch.Tensor, n: int, seed: int) -> list[torch.Tensor]:
    """The reference's input for one test point: its AugMix views from the data loader's transform."""
    import numpy as np
    from torchvision import transforms

    augmenter = bench.augmix.AugMixAugmenter(None, transforms.ToTensor(), "cifar10_c", n_views=n, use_augmix=True)
    torch.manual_seed(seed)
    np.random.seed(seed)
    return [v.unsqueeze(0) for v in augmenter(_pil(image))]


@pytest.mark.parametrize("kind", ["cnn", "vit"])
def test_memo_equals_the_reference(bench, kind):
    """Three test points, one at a time (``cfgs/cifar10_c/memo.yaml``: batch size 1, episodic, SGD
    lr 0.005, BatchNorm with the source prior ``alpha = 0.1``), 8 AugMix views each on both sides:
    each point's prediction, and after the last point every parameter (the reference's
    ``AlphaBatchNorm`` wraps the CNN's layers: its names without ``.layer``) and the momentum
    buffer. Mutations checked: no reset between points, the mean entropy of the views instead of the marginal's (the
    biased variance hides in this tolerance: :func:`test_prior_batch_norm_equals_alpha_batch_norm`)."""
    import re

    model = _source_model(kind, head_scale=3.0)
    strategy = _clpeft("memo", kind, model, n_augmentations=8)
    cfg = _cfg(bench, "memo", **{"TEST.BATCH_SIZE": 1, "TEST.N_AUGMENTATIONS": 8})
    assert cfg.MODEL.EPISODIC and cfg.BN.ALPHA == strategy.prior.alpha
    ref = bench.memo.MEMO(cfg, _reference_model(model), CLASSES)
    images = _images(3, 140)
    for i, image in enumerate(images):
        torch.manual_seed(150 + i)
        strategy.augmix.seed(150 + i)
        ours = _adapt(strategy, image[None])
        theirs = ref(_memo_views(bench, image, 8, 150 + i))
        torch.testing.assert_close(ours, theirs, **CLOSE)
    ours = _named(strategy)
    theirs = {re.sub(r"\.layer\.(weight|bias)$", r".\1", n): p for n, p in ref.model.named_parameters()}
    _assert_same_parameters(ours, theirs, _params(model))
    names = {id(p): re.sub(r"\.layer\.(weight|bias)$", r".\1", n) for n, p in ref.model.named_parameters()}
    _assert_same_optimizer_state(
        strategy.adaptation.optimizer._optimizer, ours, ref.optimizer, {names[id(p)]: p for p in ref.model.parameters()}
    )


# ------------------------------------------------------------------ bn_adapt statistics


@pytest.mark.parametrize(("statistics", "batch"), [("alpha", 1), ("alpha", 4), ("ema", BATCH)])
def test_bn_adapt_statistics_equal_norm_alpha_and_norm_ema(bench, statistics, batch):
    """``statistics: alpha`` = ``BNAlpha`` (``cfgs/cifar10_c/norm_alpha.yaml``: ``BN.ALPHA`` 0.1,
    test batches of one image; and of four) and ``statistics: ema`` = ``BNEMA``
    (``norm_ema.yaml``): the predictions of three batches, and for ``ema`` the running statistics
    after them, on a CNN whose source statistics differ from the test batches'. Mutations
    checked: ``alpha`` on the source side of the mix, ``ema`` without the update."""
    model = _source_model("cnn", head_scale=3.0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    cfg = _cfg(bench, f"norm_{statistics}", **{"TEST.BATCH_SIZE": batch})
    strategy = _clpeft("bn_adapt", "cnn", model, statistics=statistics, alpha=cfg.BN.ALPHA)
    assert cfg.BN.ALPHA == _defaults("bn_adapt")["alpha"]
    reference_model = _reference_model(model)
    # clpeft's Backbone.train keeps a backbone without trainable parameters in eval mode; the
    # benchmark's models are plain modules whose train() BNEMA relies on
    reference_model[0].train = types.MethodType(nn.Module.train, reference_model[0])
    ref = {"alpha": bench.norm.BNAlpha, "ema": bench.norm.BNEMA}[statistics](cfg, reference_model, CLASSES)
    source_out = None
    for i in range(3):
        x = _images(batch, 160 + i)
        out = _adapt(strategy, x)
        torch.testing.assert_close(out, ref(_float(x)), **CLOSE, msg=lambda m: f"batch {i}: {m}")
        with torch.no_grad():
            source_out = model.eval()(_float(x))
    assert (out - source_out).abs().max() > 1e-3, i  # the test statistics mattered
    if statistics == "ema":
        theirs = ref.model.model.state_dict()
        for name, buffer in classifier(strategy.backbone, strategy.head).named_buffers():
            torch.testing.assert_close(buffer.float(), theirs[name].float(), rtol=1e-5, atol=1e-6)
        assert not torch.equal(strategy.backbone.stem[1].running_mean, model[0].stem[1].running_mean)


# ------------------------------------------------------------------ label shift


def _sort_by_dirichlet():
    """The benchmark's ``sort_by_dirichlet`` (``datasets/data_loading.py``), compiled alone: the
    module imports every dataset class of the benchmark, the function only numpy and time."""
    import ast
    import logging
    import time

    import numpy as np

    path = ref_dir("test-time-adaptation") / SUBDIR / "datasets" / "data_loading.py"
    tree = ast.parse(path.read_text())
    function = next(node for node in tree.body if isinstance(node, ast.FunctionDef) and node.name == "sort_by_dirichlet")
    namespace = {"np": np, "time": time, "logger": logging.getLogger("reference")}
    exec(compile(ast.Module([function], []), str(path), "exec"), namespace)
    return namespace["sort_by_dirichlet"]


@pytest.mark.parametrize(("delta", "classes", "per_class"), [(0.01, 10, 30), (0.1, 10, 30), (1.0, 5, 40), (1.0, 3, 12)])
def test_dirichlet_order_equals_sort_by_dirichlet(delta, classes, per_class):
    """Seeded alike (numpy's global generator for the reference, a ``RandomState`` here), the
    label-shift order is the reference's sequence of samples, redraws until every chunk holds 10
    samples included (48 rounds at 0.01, 4 at 0.1). Mutations checked: chunks balanced at
    ``N / C`` with ``<=``, the class groups of a chunk in label order."""
    import numpy as np

    sort_by_dirichlet = _sort_by_dirichlet()
    labels = np.repeat(np.arange(classes), per_class)
    np.random.default_rng(classes).shuffle(labels)
    samples = [(f"image_{i}", int(y)) for i, y in enumerate(labels)]
    np.random.seed(5)
    expected = [int(name.split("_")[1]) for name, _ in sort_by_dirichlet(delta, samples)]
    rng = np.random.RandomState(5)
    assert dirichlet_order(labels, delta, rng).tolist() == expected
    assert rng.uniform() == np.random.uniform()  # the same number of draws


# ------------------------------------------------------------------ rotta


@pytest.mark.parametrize("kind", ["cnn", "vit"])
def test_rotta_equals_the_reference(bench, kind):
    """Three batches of 16 with the CIFAR-10-C config and a memory of 8 samples updated every 8
    (so two updates per batch): the teacher's predictions, the memory (pseudo-labels, ages),
    student, teacher, their robust BatchNorm statistics and Adam's state. The reference's
    ``forward_and_adapt`` calls ``loss_calculation(x)``, which takes no argument (a ``TypeError``
    on every update outside mixed precision): the shim drops the argument. Mutations checked:
    timeliness weight ``exp(-a)`` alone, the biased variance made unbiased, the teacher's
    statistics copied from the student (the memory's rules: ``tests/strategies/test_tta_breadth.py``)."""
    import re

    model = _source_model(kind, head_scale=3.0)
    options = {"ROTTA.MEMORY_SIZE": 8, "ROTTA.UPDATE_FREQUENCY": 8}
    strategy = _clpeft("rotta", kind, model, memory_size=8, update_frequency=8)
    reference_model = _reference_model(model)
    # as for BNEMA: the benchmark's teacher is a plain module that train() switches (clpeft's
    # Backbone.train keeps a backbone without trainable parameters, such as a teacher, in eval mode)
    reference_model[0].train = types.MethodType(nn.Module.train, reference_model[0])
    ref = bench.rotta.RoTTA(_cfg(bench, "rotta", **options), reference_model, CLASSES)
    ref.loss_calculation = lambda *_: bench.rotta.RoTTA.loss_calculation(ref)
    for i in range(3):
        x = _images(BATCH, 170 + i)
        torch.manual_seed(180 + i)
        ours = _adapt(strategy, x)
        torch.manual_seed(180 + i)
        torch.testing.assert_close(ours, ref(_float(x)), **CLOSE, msg=lambda m: f"batch {i}: {m}")
        theirs = [(c, item.age) for c, items in enumerate(ref.mem.data) for item in items]
        assert [(c, a) for c, items in enumerate(strategy.memory.items) for _, _, a in items] == theirs
    ours = _named(strategy)
    theirs = dict(ref.model.named_parameters())
    _assert_same_parameters(ours, theirs, _params(model))
    _assert_same_parameters(dict(strategy.teacher.model.named_parameters()), dict(ref.model_ema.named_parameters()))
    _assert_same_optimizer_state(strategy.adaptation.optimizer._optimizer, ours, ref.optimizer, theirs)
    for ours_net, theirs_net in [(classifier(strategy.backbone, strategy.head), ref.model), (strategy.teacher.model, ref.model_ema)]:
        buffers = {re.sub(r"running_(mean|var)$", r"source_\1", n): b for n, b in ours_net.named_buffers() if "running" in n}
        theirs_buffers = {n: b for n, b in theirs_net.named_buffers() if "source_" in n}
        assert buffers.keys() == theirs_buffers.keys()
        assert not torch.equal(buffers["0.stem.1.source_mean"], model[0].stem[1].running_mean) if kind == "cnn" else not buffers
        for name, b in buffers.items():
            torch.testing.assert_close(b, theirs_buffers[name], rtol=1e-5, atol=1e-6)
