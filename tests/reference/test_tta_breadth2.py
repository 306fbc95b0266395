"""clpeft's ROID, RPL, CMF and SANTA against Döbler et al.'s benchmark (mariodoebler/test-time-adaptation).

The benchmark's ``classification/methods/{roid,rpl,cmf,santa}.py`` and its ROID augmentation
(``augmentations/transforms_cotta.py``: ``get_tta_transforms(padding_mode="reflect",
cotta_augs=False)``) run next to clpeft's strategies on the tiny networks, weights, batches and
configs of ``test_tta_methods.py`` (whose helpers this file uses): a BatchNorm CNN and timm's
``test_vit`` with LayerNorm, 3 x 32 x 32 images, ``cfgs/cifar10_c/<method>.yaml`` over
``conf.py``. Random draws (the augmentations) are made identical by seeding torch's generator
before each batch on both sides.

Compared after every batch: the prediction and the method's state (ROID's and CMF's moving class
prior, CMF's hidden variance and ``beta``); after the last batch every parameter (and CMF's
hidden model, SANTA's projection head) and the optimizer state. Tolerances are those of
``test_tta_methods.py`` (``CLOSE``, Adam's float noise bounded by ``NOISE``). Mutations checked
once are named in each test's docstring.
"""

from __future__ import annotations

import copy
import importlib
import inspect
import types

import pytest
import torch

from clpeft.components.tta.certainty_diversity import roid_augmentation
from clpeft.components.tta.generalized_cross_entropy import generalized_cross_entropy
from clpeft.components.tta.online_adaptation import classifier
from clpeft.registry import strategies

from .conftest import ref_dir, stub_module
from .test_tta_methods import (
    BATCH,
    CLASSES,
    CLOSE,
    SUBDIR,
    SourceLoader,
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
    _recording_batches,
    _reference_model,
    _source_model,
)

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")


@pytest.fixture
def bench(load_reference):
    """The benchmark's ``conf``, the methods ``roid``, ``rpl``, ``cmf``, ``santa`` and its CoTTA
    transforms (stubs as in ``test_tta_methods.py``: ``get_source_loader`` serves ``bench.source``)."""
    root = ref_dir("test-time-adaptation") / SUBDIR
    pytest.importorskip("yacs", reason="the benchmark's configs need yacs (pip install -e .[dev])")
    ns = types.SimpleNamespace(root=root, source=None, request=None)

    def get_source_loader(**request):
        ns.request = request
        return None, ns.source

    def split_up_model(model, arch_name, dataset_name):  # the reference's signature: (features, classifier)
        return model[0], model[1]

    stubs = {
        "methods": _package("methods", root / "methods"),
        "utils": _package("utils", root / "utils"),
        "augmentations": _package("augmentations", root / "augmentations"),
        "models": _package("models"),
        "models.model": stub_module(
            "models.model",
            split_up_model=split_up_model,
            ResNetDomainNet126=type("ResNetDomainNet126", (), {}),
            BaseModel=_reference_class(root / "models" / "model.py", "BaseModel", split_up_model=split_up_model),
        ),
        "datasets": _package("datasets"),
        "datasets.data_loading": stub_module("datasets.data_loading", get_source_loader=get_source_loader),
        "iopath": _package("iopath"),
        "iopath.common": _package("iopath.common"),
        "iopath.common.file_io": stub_module("iopath.common.file_io", g_pathmgr=None),
    }
    with load_reference("test-time-adaptation", "conf", SUBDIR, stubs=stubs) as conf:
        ns.conf = conf
        for name in ("roid", "rpl", "cmf", "santa", "adacontrast"):
            setattr(ns, name, importlib.import_module(f"methods.{name}"))
        ns.transforms = importlib.import_module("augmentations.transforms_cotta")
        yield ns


def _reference_class(path, name: str, **namespace):
    """One class of a reference file, compiled alone (``models/model.py`` imports every model
    family of the benchmark; AdaContrast's ``BaseModel`` needs only torch and ``split_up_model``)."""
    import ast

    tree = ast.parse(path.read_text())
    node = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == name)
    scope = {"torch": torch, "nn": torch.nn, **namespace}
    exec(compile(ast.Module([node], []), str(path), "exec"), scope)
    return scope[name]


def _defaults(name: str) -> dict:
    signature = inspect.signature(strategies.get(name).__init__)
    return {k: p.default for k, p in signature.parameters.items() if p.default is not inspect.Parameter.empty}


def _optimizer_defaults(cfg) -> dict:
    return {"optimizer": "adam", "lr": cfg.OPTIM.LR, "momentum": cfg.OPTIM.BETA, "weight_decay": cfg.OPTIM.WD, "params": "norm"}


def _run(strategy, ref, images, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Both sides on the same batches, torch's generator seeded alike before each."""
    outputs = []
    for i, x in enumerate(images):
        torch.manual_seed(seed + i)
        ours = _adapt(strategy, x)
        torch.manual_seed(seed + i)
        outputs.append((ours, ref(_float(x))))
    return outputs


def _assert_same_end_state(strategy, ref, model) -> None:
    ours, theirs = _named(strategy), dict(ref.model.named_parameters())
    _assert_same_parameters(ours, theirs, _params(model))
    _assert_same_optimizer_state(strategy.adaptation.optimizer._optimizer, ours, ref.optimizer, theirs)


# ------------------------------------------------------------------ defaults


def test_defaults_are_the_cifar10_c_configs(bench):
    """ROID's, RPL's, CMF's and SANTA's defaults are ``cfgs/cifar10_c/<method>.yaml`` over ``conf.py``."""
    roid, rpl, cmf, santa = (_cfg(bench, m) for m in ("roid", "rpl", "cmf", "santa"))
    assert _defaults("roid") == {
        **_optimizer_defaults(roid),
        "use_weighting": roid.ROID.USE_WEIGHTING,
        "use_prior_correction": roid.ROID.USE_PRIOR_CORRECTION,
        "use_consistency": roid.ROID.USE_CONSISTENCY,
        "momentum_src": roid.ROID.MOMENTUM_SRC,
        "momentum_probs": roid.ROID.MOMENTUM_PROBS,
        "temperature": roid.ROID.TEMPERATURE,
        "flip": 0.5,
    }
    assert _defaults("rpl") == {**_optimizer_defaults(rpl), "q": rpl.RPL.Q}
    assert _defaults("cmf") == {
        **_optimizer_defaults(cmf),
        **{k: v for k, v in _defaults("roid").items() if k not in ("momentum_src", *_optimizer_defaults(roid))},
        "alpha": cmf.CMF.ALPHA,
        "gamma": cmf.CMF.GAMMA,
        "q": cmf.CMF.Q,
    }
    assert _defaults("santa") == {
        **_optimizer_defaults(santa),
        "lambda_ce_trg": santa.SANTA.LAMBDA_CE_TRG,
        "lambda_cont": santa.SANTA.LAMBDA_CONT,
        "temperature": santa.CONTRAST.TEMPERATURE,
        "projection_dim": santa.CONTRAST.PROJECTION_DIM,
        "flip": 0.5,
    }
    assert santa.CONTRAST.MODE == "all" and santa.SOURCE.NUM_SAMPLES == -1 and santa.SOURCE.PERCENTAGE == 1.0
    ada = _cfg(bench, "adacontrast")
    assert _defaults("adacontrast") == {
        "optimizer": ada.OPTIM.METHOD.lower(),
        "lr": ada.OPTIM.LR,
        "momentum": ada.OPTIM.MOMENTUM,
        "weight_decay": ada.OPTIM.WD,
        "params": "all",
        "ema_momentum": ada.M_TEACHER.MOMENTUM,
        "temperature": ada.CONTRAST.TEMPERATURE,
        "queue_size": ada.ADACONTRAST.QUEUE_SIZE,
        "num_neighbors": ada.ADACONTRAST.NUM_NEIGHBORS,
        "distance": ada.ADACONTRAST.DIST_TYPE,
        "class_aware": ada.ADACONTRAST.CONTRAST_TYPE == "class_aware",
        "alpha": ada.ADACONTRAST.ALPHA,
        "beta": ada.ADACONTRAST.BETA,
        "eta": ada.ADACONTRAST.ETA,
        "supervision": ada.ADACONTRAST.CE_SUP_TYPE,
    }
    assert ada.OPTIM.NESTEROV and ada.OPTIM.DAMPENING == 0.0 and ada.ADACONTRAST.CE_TYPE == "standard"
    assert ada.ADACONTRAST.REFINE_METHOD == "nearest_neighbors"
    assert cmf.CMF.TYPE == "lp"  # "op" computes the same in the code (clpeft's ModelFusion docstring)
    for cfg in (roid, rpl, cmf, santa, ada):
        assert cfg.OPTIM.METHOD in ("Adam", "SGD") and cfg.OPTIM.STEPS == 1 and not cfg.MODEL.EPISODIC and cfg.TEST.WINDOW_LENGTH == 1
        assert cfg.MODEL.RESET_AFTER_NUM_UPDATES == 0


# ------------------------------------------------------------------ augmentation


@pytest.mark.parametrize(("channels", "size"), [(3, 32), (1, 28), (3, 8), (3, 5)])
def test_roid_augmentation_equals_the_reflect_transform_without_blur_and_noise(bench, channels, size):
    """Seeded alike, ``roid_augmentation()`` draws and applies ``get_tta_transforms(padding_mode=
    "reflect", cotta_augs=False)``: reflect padding, no blur, no noise, and neither's random draw
    (the generator ends in the same state); on tiny images the zero fill reaches the crop.
    Mutations checked: ``symmetric`` reflection (grid_sample without ``align_corners``), the blur's
    ``sigma`` still drawn, edge padding."""
    x = torch.rand(5, channels, size, size, generator=torch.Generator().manual_seed(0))
    transform = bench.transforms.get_tta_transforms((size, size), padding_mode="reflect", cotta_augs=False)
    torch.manual_seed(3)
    expected = [transform(x) for _ in range(6)]
    after_reference = torch.rand(3)
    torch.manual_seed(3)
    augment = roid_augmentation()
    got = augment.apply(x, augment.sample(6, x.shape)).view(6, *x.shape)
    assert torch.equal(torch.rand(3), after_reference)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=2e-5)


# ------------------------------------------------------------------ roid


@pytest.mark.parametrize(
    ("kind", "options"),
    [
        ("cnn", {}),
        ("vit", {}),
        ("cnn", {"ROID.USE_PRIOR_CORRECTION": False, "ROID.MOMENTUM_SRC": 0.9}),
        ("cnn", {"ROID.USE_CONSISTENCY": False, "ROID.TEMPERATURE": 0.5}),
    ],
)
def test_roid_equals_the_reference(bench, kind, options):
    """Four batches with the CIFAR-10-C config (and with each option changed once): the
    prior-corrected pre-update predictions, the moving class prior after each batch, every
    parameter (ensembled with the source) and Adam's state. clpeft augments with its own
    ``roid_augmentation()`` here (equal to the reference's transform to 1e-5 per pixel). Mutations
    checked: the consistency loss averaged over the kept samples instead of divided by the batch
    size, the prior added to the logits instead of multiplying them, the diversity measured
    against the batch's mean prediction instead of the moving prior."""
    cfg = _cfg(bench, "roid", **options)
    model = _source_model(kind, head_scale=3.0)
    strategy = _clpeft(
        "roid",
        kind,
        model,
        use_prior_correction=cfg.ROID.USE_PRIOR_CORRECTION,
        use_consistency=cfg.ROID.USE_CONSISTENCY,
        momentum_src=cfg.ROID.MOMENTUM_SRC,
        temperature=cfg.ROID.TEMPERATURE,
    )
    ref = bench.roid.ROID(cfg, _reference_model(model), CLASSES)
    for i in range(4):
        x = _images(BATCH, 400 + i)
        torch.manual_seed(410 + i)
        ours = _adapt(strategy, x)
        torch.manual_seed(410 + i)
        torch.testing.assert_close(ours, ref(_float(x)), **CLOSE, msg=lambda m: f"batch {i}: {m}")
        torch.testing.assert_close(strategy.loss.class_probs, ref.class_probs_ema, **CLOSE)
    _assert_same_end_state(strategy, ref, model)


# ------------------------------------------------------------------ rpl


def test_generalized_cross_entropy_equals_utils_losses(bench):
    """Pseudo-labels (no targets) and given targets, ``q`` 0.8 and 0.3. Mutation checked: ``p_y^q``
    of the softmax's maximum instead of the target's probability."""
    losses = importlib.import_module("utils.losses")
    g = torch.Generator().manual_seed(0)
    logits, targets = torch.randn(8, CLASSES, generator=g), torch.randint(0, CLASSES, (8,), generator=g)
    for q in (0.8, 0.3):
        reference = losses.GeneralizedCrossEntropy(q=q)
        torch.testing.assert_close(generalized_cross_entropy(logits, q=q), reference(logits))
        torch.testing.assert_close(generalized_cross_entropy(logits, targets, q), reference(logits, targets))


@pytest.mark.parametrize(("kind", "q"), [("cnn", 0.8), ("vit", 0.8), ("cnn", 0.3)])
def test_rpl_equals_the_reference(bench, kind, q):
    """Three batches with the CIFAR-10-C config (and ``q`` 0.3): the pre-update predictions, every
    parameter and Adam's state. Mutations checked: the post-update prediction, the loss summed
    instead of averaged, ``q`` read as ``1 - q``."""
    model = _source_model(kind, head_scale=3.0)
    strategy = _clpeft("rpl", kind, model, q=q)
    ref = bench.rpl.RPL(_cfg(bench, "rpl", **{"RPL.Q": q}), _reference_model(model), CLASSES)
    for ours, theirs in _run(strategy, ref, [_images(BATCH, 420 + i) for i in range(3)], 430):
        torch.testing.assert_close(ours, theirs, **CLOSE)
    _assert_same_end_state(strategy, ref, model)


# ------------------------------------------------------------------ cmf


@pytest.mark.parametrize(
    ("kind", "options"),
    [("cnn", {}), ("vit", {}), ("cnn", {"CMF.Q": 40.0, "CMF.ALPHA": 0.9, "CMF.GAMMA": 0.8, "ROID.USE_CONSISTENCY": False})],
)
def test_cmf_equals_the_reference(bench, monkeypatch, kind, options):
    """Four batches with the CIFAR-10-C config (and with a large process noise, so that the gain
    ``beta`` falls to its floor 0.89 and the filter blends the adapted model in; on the ViT the
    default noise already lowers it below 1): the prior-corrected
    predictions, the moving class prior, the hidden variance and ``beta`` after each batch; the
    adapted parameters, the hidden model's and Adam's state after the last. The reference puts its
    class prior on the GPU with ``.cuda()``: the identity on this CPU. Mutations checked: ``q`` not
    scaled by the adapted weights over 38,400, the gain's floor 0.89 left out, the fusion before the
    filter's update."""
    cfg = _cfg(bench, "cmf", **options)
    model = _source_model(kind, head_scale=3.0)
    strategy = _clpeft("cmf", kind, model, alpha=cfg.CMF.ALPHA, gamma=cfg.CMF.GAMMA, q=cfg.CMF.Q, use_consistency=cfg.ROID.USE_CONSISTENCY)
    with monkeypatch.context() as m:
        m.setattr(torch.Tensor, "cuda", lambda self, *a, **k: self)
        ref = bench.cmf.CMF(cfg, _reference_model(model), CLASSES)
    betas = []
    for i in range(4):
        x = _images(BATCH, 440 + i)
        torch.manual_seed(450 + i)
        ours = _adapt(strategy, x)
        torch.manual_seed(450 + i)
        torch.testing.assert_close(ours, ref(_float(x)), **CLOSE, msg=lambda m: f"batch {i}: {m}")
        torch.testing.assert_close(strategy.loss.class_probs, ref.class_probs_ema, **CLOSE)
        assert strategy.fusion.beta == pytest.approx(ref.beta, rel=1e-9)
        assert float(strategy.fusion.variance) == pytest.approx(ref.hidden_var, rel=1e-9)
        betas.append(ref.beta)
    assert min(betas) == (0.89 if options else 1.0) or kind == "vit", betas  # the floor; the tiny CNN's default q keeps beta at 1
    assert kind == "cnn" or min(betas) < 1.0, betas
    _assert_same_end_state(strategy, ref, model)
    hidden = dict(ref.hidden_model.named_parameters())
    adapted = [n for n, p in ref.model.named_parameters() if p.requires_grad]
    _assert_same_parameters({n: p for n, p in strategy.fusion.hidden.named_parameters() if n in adapted}, {n: hidden[n] for n in adapted})


# ------------------------------------------------------------------ santa


@pytest.mark.parametrize(
    ("kind", "options"), [("cnn", {}), ("vit", {}), ("cnn", {"SANTA.LAMBDA_CE_TRG": 0.5, "CONTRAST.TEMPERATURE": 0.2})]
)
def test_santa_equals_the_reference(bench, tmp_path, kind, options):
    """40 source samples (one shuffled pass in 3 batches of the test batch size, served to the
    reference's ``get_source_loader``), then three test batches: the prototypes, the pre-update
    predictions, every parameter (model and projection head) and Adam's state. The projection
    heads are drawn at random on both sides at different times: the reference's is loaded with
    clpeft's. clpeft augments with its own ``TTAugment()`` (the reference's transform to 1e-5 per
    pixel). Mutations checked: the anchoring cross-entropy the other way round (the anchor's
    probabilities), the nearest prototype by Euclidean distance."""
    cfg = _cfg(bench, "santa", **{"CKPT_DIR": str(tmp_path), **options})
    model = _source_model(kind, head_scale=3.0)
    log = []
    strategy = _clpeft(
        "santa",
        kind,
        model,
        start=lambda s: _recording_batches(s, log),
        lambda_ce_trg=cfg.SANTA.LAMBDA_CE_TRG,
        temperature=cfg.CONTRAST.TEMPERATURE,
    )
    prototype_pass = [(b.x, b.y) for shuffled, b in log if shuffled]
    assert len(prototype_pass) == 3 and len(log) == 3
    bench.source = SourceLoader([prototype_pass], BATCH)
    ref = bench.santa.SANTA(cfg, _reference_model(model), CLASSES)
    assert bench.request["batch_size"] == BATCH and bench.request["num_samples"] == -1
    torch.testing.assert_close(strategy.contrast.prototypes.means().float(), ref.prototypes_src.squeeze(1), rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        ref.projector.load_state_dict(copy.deepcopy(strategy.contrast.projector.state_dict()))
    for ours, theirs in _run(strategy, ref, [_images(BATCH, 460 + i) for i in range(3)], 470):
        torch.testing.assert_close(ours, theirs, **CLOSE)
    ours, theirs = _named(strategy), dict(ref.model.named_parameters())
    _assert_same_parameters(ours, theirs, _params(model))
    _assert_same_parameters(dict(strategy.contrast.projector.named_parameters()), dict(ref.projector.named_parameters()))
    ours.update({f"projector.{n}": p for n, p in strategy.contrast.projector.named_parameters()})
    theirs.update({f"projector.{n}": p for n, p in ref.projector.named_parameters()})
    _assert_same_optimizer_state(strategy.adaptation.optimizer._optimizer, ours, ref.optimizer, theirs)


# ------------------------------------------------------------------ adacontrast

SEED = 0  # of the random initial queue


@pytest.mark.parametrize(
    ("kind", "options", "batch", "batches"),
    [
        ("cnn", {}, 32, 3),
        pytest.param("cnn", {}, 128, 10, marks=pytest.mark.slow),
        pytest.param("vit", {}, 128, 10, marks=pytest.mark.slow),
        pytest.param(
            "cnn", {"ADACONTRAST.DIST_TYPE": "euclidean", "ADACONTRAST.CE_SUP_TYPE": "weak_weak"}, 128, 10, marks=pytest.mark.slow
        ),
    ],
)
def test_adacontrast_equals_the_reference(bench, monkeypatch, kind, options, batch, batches):
    """Ten batches of 128 (slow; the nearest-neighbour refinement starts after 1,024 samples:
    batches 9 and 10) with the CIFAR-10-C config and a queue of 256 (so queue and bank wrap
    around), on the CNN and the ViT, and once with Euclidean neighbours and weak-view supervision;
    by default three batches of 32 with a queue of 64 (the queue wraps, no refinement yet). The reference's loader builds the
    views; here it is given the views clpeft drew (:class:`ContrastiveViews`), and its random
    initial queue is loaded with clpeft's. Compared after every batch: the post-update prediction
    (evaluation mode), the queue's keys and labels, the bank; after the last: every parameter of
    the model and the momentum model, the BatchNorm running statistics and SGD's momentum (to
    ``atol 1e-4``: sums of ten gradients of order 1, float noise up to 6e-5 in the first layers). The
    reference's ``BaseModel`` wants an ``nn.Linear`` head: its model has one holding clpeft's
    head weights; its momentum model's backbone is switched by ``nn.Module.train``. Mutations checked: the momentum model updated after the step, the queue written
    before the class-aware mask is taken, the refinement from the first batch, the diversity term's
    sign."""
    import clpeft.strategies.adacontrast as module

    queue = 256 if batch * batches > 1024 else 64
    cfg = _cfg(bench, "adacontrast", **{"ADACONTRAST.QUEUE_SIZE": queue, "TEST.BATCH_SIZE": batch, **options})
    model = _source_model(kind, head_scale=3.0)
    torch.manual_seed(SEED)  # the random initial queue
    strategy = _clpeft(
        "adacontrast",
        kind,
        model,
        queue_size=queue,
        distance=cfg.ADACONTRAST.DIST_TYPE,
        supervision=cfg.ADACONTRAST.CE_SUP_TYPE,
    )
    head = torch.nn.Linear(model[1].weight.shape[1], CLASSES)
    head.load_state_dict(model[1].state_dict())
    reference_model = torch.nn.Sequential(copy.deepcopy(model[0]), head)
    reference_model.model_preprocess = None
    # as in test_tta_breadth.py's RoTTA test: the benchmark's momentum model is a plain module that
    # train() switches (clpeft's Backbone.train keeps a backbone without trainable parameters in eval mode)
    reference_model[0].train = types.MethodType(torch.nn.Module.train, reference_model[0])
    ref = bench.adacontrast.AdaContrast(cfg, reference_model, CLASSES)
    with torch.no_grad():
        ref.model.mem_feat.copy_(strategy.memory.keys)
        ref.model.mem_labels.copy_(strategy.memory.key_labels)
    views = []
    draw = module.ContrastiveViews.__call__
    monkeypatch.setattr(module.ContrastiveViews, "__call__", lambda self, x: (lambda v: (views.append(v), v)[1])(draw(self, x)))
    for i in range(batches):
        x = _images(batch, 480 + i)
        torch.manual_seed(490 + i)
        ours = _adapt(strategy, x)
        theirs = ref([_float(x), *views[-1]])
        torch.testing.assert_close(ours, theirs, **CLOSE, msg=lambda m: f"batch {i}: {m}")
        assert torch.equal(strategy.memory.key_labels, ref.model.mem_labels), i
        torch.testing.assert_close(strategy.memory.keys, ref.model.mem_feat, **CLOSE)
        torch.testing.assert_close(strategy.memory.bank["features"], ref.banks["features"], **CLOSE)
        torch.testing.assert_close(strategy.memory.bank["probs"], ref.banks["probs"], **CLOSE)
    assert ref.first_X_samples == int(strategy.memory.labelled) == min(batch * batches, 1024)
    ours, theirs = _named(strategy), dict(reference_model.named_parameters())
    _assert_same_parameters(ours, theirs, _params(model))
    teacher = {n.replace("encoder.", "0.", 1).replace("fc.", "1.", 1): p for n, p in ref.momentum_model.named_parameters()}
    _assert_same_parameters(dict(strategy.teacher.model.named_parameters()), teacher)
    for name, b in classifier(strategy.backbone, strategy.head).named_buffers():
        torch.testing.assert_close(b.float(), dict(reference_model.named_buffers())[name].float(), **CLOSE)
    names = {id(p): n for n, p in theirs.items()}
    expected = {names[id(p)]: state["momentum_buffer"] for p, state in ref.optimizer.state.items()}
    got = {n: strategy.adaptation.optimizer._optimizer.state[p]["momentum_buffer"] for n, p in ours.items() if p.requires_grad}
    assert got.keys() == expected.keys()
    for name, buffer in got.items():  # sums of ten gradients of order 1: float noise up to 6e-5 in the first layers
        torch.testing.assert_close(buffer, expected[name], rtol=1e-4, atol=1e-4, msg=name)
