"""clpeft's CoTTA against the original code (qinenergy/cotta, ``cifar/cotta.py``, ``cifar/my_transforms.py``).

The benchmark of Döbler et al. re-implements CoTTA (``tests/reference/test_tta_methods.py``);
this module checks clpeft against the code that produced the paper's CIFAR-10-C numbers, with
its ``cfgs/cifar10/cotta.yaml`` (Adam lr 1e-3, beta 0.9, ``MT`` 0.999, ``RST`` 0.01, ``AP``
0.92) and its own ``configure_model`` / ``collect_params``. Same tiny BatchNorm CNN and batches
as there; the random draws are made identical by seeding torch's generator on both sides.

Shims from the test side: torchvision's ``RandomAffine`` takes ``interpolation``/``fill``
instead of the ``resample``/``fillcolor`` the code passes (torchvision < 0.13); ``.cuda()`` of
the restore masks is the identity on this CPU. The original's ``fillcolor=None`` left the zero
fill unblended, while ``fill=0`` blends it by coverage; the fill never reaches the 32-pixel
crop, so the two agree here.

A deliberate difference, shown by :func:`test_a_confident_anchor_still_draws_32_augmentations_in_the_original`:
the original draws 32 augmentations for every batch and discards them when the anchor is
confident; clpeft (like the benchmark's re-implementation) skips them. The updates are the same;
the random stream, hence which elements the restore masks pick, differs afterwards.

Tolerances as in ``test_tta_methods.py``. Mutations checked: see each test's docstring.
"""

from __future__ import annotations

import copy
import importlib
import types

import pytest
import torch
from torchvision.transforms import InterpolationMode

from clpeft.components.tta.augment import TTAugment

from .conftest import ref_dir, stub_module
from .test_tta_methods import (
    BATCH,
    CLOSE,
    _adapt,
    _assert_same_optimizer_state,
    _assert_same_parameters,
    _clpeft,
    _float,
    _images,
    _named,
    _params,
    _recording_rand,
    _source_model,
)

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")


def _old_torchvision(transforms: types.ModuleType) -> types.SimpleNamespace:
    """``torchvision.transforms`` whose ``RandomAffine`` takes the pre-0.13 keyword names."""

    class RandomAffine(transforms.RandomAffine):
        def __init__(self, *args, resample=InterpolationMode.NEAREST, fillcolor=None, **kwargs):
            super().__init__(*args, interpolation=resample, fill=0 if fillcolor is None else fillcolor, **kwargs)

    names = {name: getattr(transforms, name) for name in dir(transforms) if not name.startswith("_")}
    return types.SimpleNamespace(**{**names, "RandomAffine": RandomAffine})


@pytest.fixture
def original(load_reference, monkeypatch):
    """The original ``cotta`` module (with the shims above) and its CIFAR-10 config: ``conf.py``'s
    defaults merged with ``cfgs/cifar10/cotta.yaml`` by yacs (``iopath``, its file opener, stubbed)."""
    pytest.importorskip("yacs", reason="the original configs need yacs (pip install -e .[dev])")
    monkeypatch.setattr(torch.Tensor, "cuda", lambda self, *args, **kwargs: self)
    stubs = {name: stub_module(name, __path__=[]) for name in ("iopath", "iopath.common")}
    stubs["iopath.common.file_io"] = stub_module("iopath.common.file_io", g_pathmgr=None)
    with load_reference("cotta", "cotta", "cifar", stubs=stubs) as cotta:
        monkeypatch.setattr(cotta, "transforms", _old_torchvision(importlib.import_module("torchvision.transforms")))
        cfg = importlib.import_module("conf")._CFG_DEFAULT.clone()
        cfg.defrost()
        cfg.merge_from_file(str(ref_dir("cotta") / "cifar" / "cfgs" / "cifar10" / "cotta.yaml"))
        yield types.SimpleNamespace(cotta=cotta, cfg=cfg.OPTIM)


def _original_cotta(original, model: torch.nn.Module):
    """``CoTTA`` set up as the original ``cifar10c.py`` does (configure, collect, Adam, config values)."""
    cotta, cfg = original.cotta, original.cfg
    model = cotta.configure_model(model)
    params, _ = cotta.collect_params(model)
    optimizer = torch.optim.Adam(params, lr=cfg["LR"], betas=(cfg["BETA"], 0.999), weight_decay=cfg["WD"])
    return cotta.CoTTA(model, optimizer, steps=cfg["STEPS"], episodic=False, mt_alpha=cfg["MT"], rst_m=cfg["RST"], ap=cfg["AP"])


def test_defaults_are_the_original_config(original):
    """``cfgs/cifar10/cotta.yaml`` is clpeft's CoTTA default (and the original's ``N = 32``).
    Mutation checked: ``restore_p`` 0.001."""
    cfg = original.cfg
    strategy = _clpeft("cotta", "cnn", _source_model("cnn"))
    assert (cfg["METHOD"], cfg["STEPS"], cfg["WD"]) == ("Adam", 1, 0.0)
    assert strategy.adaptation.optimizer.lr == cfg["LR"] and strategy.adaptation.optimizer.momentum == cfg["BETA"]
    assert (strategy.teacher.momentum, strategy.restore.p, strategy.confidence_threshold) == (cfg["MT"], cfg["RST"], cfg["AP"])
    assert strategy.n_augmentations == 32


def test_augmentation_equals_the_original_get_tta_transforms(original):
    """``TTAugment`` draws and applies the original ``get_tta_transforms()`` (32 x 32 RGB).
    Mutation checked: saturation range (0.5, 1.5) -> (0.6, 1.4)."""
    x = torch.rand(6, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    transform = original.cotta.get_tta_transforms()
    torch.manual_seed(4)
    expected = [transform(x) for _ in range(5)]
    torch.manual_seed(4)
    augment = TTAugment()
    got = augment.apply(x, augment.sample(5, x.shape)).view(5, *x.shape)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=2e-5)


def test_cotta_equals_the_original(original, monkeypatch):
    """Two batches below the anchor threshold (32 augmentations on both sides): the teacher's
    predictions, every ``torch.rand`` draw (flips, restore masks), student, teacher and Adam
    state. Mutation checked: restore probability 0.01 -> 0.02."""
    model = _source_model("cnn")
    strategy = _clpeft("cotta", "cnn", model)
    ref = _original_cotta(original, copy.deepcopy(model))
    draws = _recording_rand(monkeypatch)
    for i in range(2):
        x = _images(BATCH, 90 + i)
        draws.clear()
        torch.manual_seed(400 + i)
        out = _adapt(strategy, x)
        ours = draws[:]
        draws.clear()
        torch.manual_seed(400 + i)
        torch.testing.assert_close(out, ref(_float(x)), **CLOSE)
        assert len(ours) == len(draws) and all(torch.equal(a, b) for a, b in zip(ours, draws))
    named, theirs = _named(strategy), dict(ref.model.named_parameters())
    _assert_same_parameters(named, theirs, _params(model))
    _assert_same_parameters(dict(strategy.teacher.model.named_parameters()), dict(ref.model_ema.named_parameters()))
    _assert_same_optimizer_state(strategy.adaptation.optimizer._optimizer, named, ref.optimizer, theirs)


def test_a_confident_anchor_still_draws_32_augmentations_in_the_original(original):
    """With a confident anchor both predict with the plain teacher and take the same step, but
    the original first draws (and discards) 32 augmentations: clpeft's restore masks equal the
    original's only when those draws are spent first. Mutation checked: clpeft augmenting when
    confident (its step would then use the averaged target)."""
    model = _source_model("cnn", head_scale=60.0)
    x = _images(BATCH, 95)
    outputs, named = {}, {}
    for spend in (False, True):
        strategy = _clpeft("cotta", "cnn", model)
        with torch.no_grad():
            assert strategy.anchor(x).softmax(1).max(1).values.mean() >= strategy.confidence_threshold
        torch.manual_seed(500)
        if spend:
            TTAugment().sample(32, x.shape)  # the original's 32 augmentations (their images are unused)
        outputs[spend] = _adapt(strategy, x)
        named[spend] = {n: p.detach().clone() for n, p in _named(strategy).items()}
    ref = _original_cotta(original, copy.deepcopy(model))
    torch.manual_seed(500)
    expected = ref(_float(x))
    theirs = dict(ref.model.named_parameters())
    for spend in (False, True):
        torch.testing.assert_close(outputs[spend], expected, **CLOSE)
    _assert_same_parameters(named[True], theirs, _params(model))
    restored = {spend: {n for n, p in named[spend].items() if bool((p == _params(model)[n]).any())} for spend in named}
    differing = sum(int((named[False][n] != theirs[n]).sum()) for n in theirs)
    assert differing > 0 and restored[False]  # other restore masks: other elements reset
