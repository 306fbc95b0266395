"""clpeft's test-time adaptation against Döbler et al.'s benchmark (mariodoebler/test-time-adaptation).

The benchmark's methods (``classification/methods/{tent,eata,cotta,rmt,lame,source,norm}.py``),
its CoTTA augmentation (``augmentations/transforms_cotta.py``), its losses (``utils/losses.py``)
and its CIFAR-10-C / ImageNet-C configs (``cfgs/<dataset>/<method>.yaml`` over ``conf.py``'s
defaults, read with yacs) run next to clpeft's strategies on the same tiny networks: a BatchNorm
CNN (clpeft's ``cnn``, widths [8, 16]) and, where the method adapts LayerNorm or every layer,
timm's ``test_vit``, both on 3 x 32 x 32 images (the size the benchmark's augmentation assumes
for CIFAR). Same weights; the same batches (clpeft gets them as ``uint8``, as from the engine,
the reference as floats in [0, 1], as from its loaders). Random draws are made identical by
seeding torch's generator before each step on both sides: clpeft's augmentation and restore
masks draw in the reference's order. Source data (EATA's Fisher batches, RMT's prototype pass,
warm-up and replay) is the batches clpeft drew, served to the reference by a stand-in for its
``get_source_loader`` that records what the reference asked for (batch size, sample count).

Compared: the prediction of every batch, every parameter after the last batch, the optimizer
state (Adam moments and step, SGD momentum), EATA's Fisher weights, anchors, entropy margin,
selected-sample counts and moving probability vector, CoTTA's teacher and every random draw
(flips and restore masks), RMT's prototypes, warmed-up student and teacher, projection head and
per-step loss, LAME's probabilities for each affinity.

Tolerances: outputs, parameters and optimizer states ``rtol 1e-4, atol 1e-5``. The two sides
run the same operations in a different order (EMA as ``foreach`` ops, the augmentation's grid in
float64, the blur as two 1-D passes: up to 3e-6 apart per pixel), and Adam's first step moves an
element by ``lr g / (|g| + 1e-8)``: an element whose gradient is within float noise of zero
moves by a noise-dependent part of ``lr = 1e-3`` on either side (seen: one of 12,288 weights of
a ViT MLP, 5.7e-5, under CoTTA; two of 576 conv weights against the original CoTTA). So up to 4
or 0.5 % of a tensor's elements may differ by more, within ``NOISE`` (a few steps of ``lr``); a
changed constant moves nearly every element by about a step. On the ViT the bias of the
attention keys has a zero gradient (softmax ignores a constant added to every key's score), so
Adam moves all of it by float noise: it is only bounded. Fisher weights and prototypes
``rtol 1e-5``; augmented pixels ``atol 2e-5``; random draws exactly equal.

Mutations checked once (each fails a test here, named in its docstring): constants and
defaults of every method, the augmentation's operations, ranges and draws, the order of CoTTA's
teacher update and restore, which parameters ``all`` adapts, Nesterov SGD, RMT's source
batches, LAME's affinities.
"""

from __future__ import annotations

import copy
import importlib
import inspect
import math
import types

import pytest
import torch
from torch import nn

from clpeft.backbones.cnn import CNNBackbone
from clpeft.backbones.timm_backbone import TimmBackbone
from clpeft.components.heads.classifiers import LinearHead
from clpeft.components.tta.augment import TTAugment
from clpeft.components.tta.augment_average import augmentation_average
from clpeft.components.tta.losses import entropy, multi_view_contrastive_loss, soft_cross_entropy, symmetric_cross_entropy
from clpeft.components.tta.online_adaptation import classifier
from clpeft.data import ArrayDataset, DataView
from clpeft.data_access import DataAccess
from clpeft.experience import Experience
from clpeft.registry import strategies

from .conftest import ref_dir, stub_module

SUBDIR = "classification"
SHAPE = (3, 32, 32)
BATCH = 16
CLASSES = 10
CLOSE = {"rtol": 1e-4, "atol": 1e-5}  # see the module docstring
NOISE = 1e-2  # bound of Adam's float-noise steps: a few steps of lr 1e-3
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")  # the reference's losses


def _package(name: str, path=None) -> types.ModuleType:
    return stub_module(name, __path__=[str(path)] if path is not None else [])


@pytest.fixture
def bench(load_reference):
    """The benchmark's ``conf`` and method modules. Stubs: its ``methods``, ``utils`` and
    ``augmentations`` packages without their ``__init__`` (which imports every method and its
    dependencies), ``models.model`` (only ``split_up_model``, here the split of
    ``Sequential(backbone, head)``), ``datasets.data_loading`` (only ``get_source_loader``, serving
    ``bench.source``) and ``iopath`` (``conf.py``'s file opener, unused)."""
    root = ref_dir("test-time-adaptation") / SUBDIR
    pytest.importorskip("yacs", reason="the benchmark's configs need yacs (pip install -e .[dev])")
    ns = types.SimpleNamespace(root=root, source=None, request=None)

    def get_source_loader(**request):
        ns.request = request
        return None, ns.source

    stubs = {
        "methods": _package("methods", root / "methods"),
        "utils": _package("utils", root / "utils"),
        "augmentations": _package("augmentations", root / "augmentations"),
        "models": _package("models"),
        "models.model": stub_module(
            "models.model",
            split_up_model=lambda model, arch, dataset: (model[0], model[1]),
            ResNetDomainNet126=type("ResNetDomainNet126", (), {}),
        ),
        "datasets": _package("datasets"),
        "datasets.data_loading": stub_module("datasets.data_loading", get_source_loader=get_source_loader),
        "iopath": _package("iopath"),
        "iopath.common": _package("iopath.common"),
        "iopath.common.file_io": stub_module("iopath.common.file_io", g_pathmgr=None),
    }
    with load_reference("test-time-adaptation", "conf", SUBDIR, stubs=stubs) as conf:
        ns.conf = conf
        for name in ("tent", "eata", "cotta", "rmt", "lame", "source", "norm"):
            setattr(ns, name, importlib.import_module(f"methods.{name}"))
        ns.transforms = importlib.import_module("augmentations.transforms_cotta")
        ns.losses = importlib.import_module("utils.losses")
        yield ns


class SourceLoader:
    """Stand-in for the benchmark's source ``DataLoader``: each ``iter()`` serves the next pass."""

    def __init__(self, passes: list[list[tuple[torch.Tensor, torch.Tensor]]], batch_size: int):
        self.passes = passes
        self.batch_size = batch_size

    def __iter__(self):
        return iter(self.passes.pop(0))

    def __len__(self) -> int:
        return len(self.passes[0])


def _cfg(bench, method: str, dataset: str = "cifar10_c", **options):
    """``conf.py``'s defaults merged with ``cfgs/<dataset>/<method>.yaml``, test batch size ``BATCH``."""
    cfg = bench.conf._CFG_DEFAULT.clone()
    cfg.defrost()
    cfg.merge_from_file(str(bench.root / "cfgs" / dataset / f"{method}.yaml"))
    cfg.TEST.BATCH_SIZE = BATCH
    cfg.merge_from_list([x for key, value in options.items() for x in (key, value)])
    return cfg


def _backbone(kind: str) -> nn.Module:
    if kind == "cnn":
        return CNNBackbone(SHAPE, widths=[8, 16])
    return TimmBackbone(SHAPE, model="test_vit", img_size=SHAPE[-1], freeze=False)


def _source_model(kind: str, head_scale: float = 1.0, seed: int = 0, centred: bool = False) -> nn.Sequential:
    """Random tiny network; ``head_scale`` sharpens its predictions (EATA needs reliable samples);
    ``centred`` subtracts the mean test-time feature in the head's bias, so that confident
    predictions spread over the classes instead of all falling on one."""
    torch.manual_seed(seed)
    backbone = _backbone(kind)
    head = LinearHead(backbone.feature_dim, CLASSES)
    with torch.no_grad():
        head.weight.mul_(head_scale)
        if centred:
            mean = copy.deepcopy(backbone).train()(_images(64, 99)).mean(0)  # batch statistics
            head.bias.copy_(-(head.weight @ mean))
    return classifier(backbone, head)


def _images(n: int, seed: int) -> torch.Tensor:
    """Smooth random ``uint8`` images (a 4 x 4 pattern upsampled, plus noise)."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, 4, 4, generator=g)
    x = nn.functional.interpolate(coarse, size=SHAPE[1:], mode="bilinear", align_corners=False)
    return ((x + 0.1 * torch.randn(x.shape, generator=g)).clamp(0, 1) * 255).round().to(torch.uint8)


def _stream(n_source: int = 40):
    """Experiences as the engine links them: a labelled source, then one test-time domain."""
    source = DataView.of(ArrayDataset(_images(n_source, 1), torch.arange(n_source) % CLASSES, "source"))
    classes = list(range(CLASSES))
    source_exp = Experience(0, source, None, classes, classes)
    tta_exp = Experience(1, None, None, [], classes)
    tta_exp.past = (source_exp,)
    return source_exp, tta_exp


def _clpeft(name: str, kind: str, model: nn.Sequential, stream=None, start=None, **params):
    """clpeft's strategy on ``model``'s weights, after the source phase and the test domain's start
    (``start``, if given, runs just before the domain starts)."""
    source_exp, tta_exp = stream or _stream()
    strategy = strategies.get(name)(_backbone(kind), **params)
    strategy.before_experience(source_exp)
    strategy.backbone.load_state_dict(model[0].state_dict())
    strategy.head.load_state_dict(model[1].state_dict())
    strategy.attach(DataAccess(torch.device("cpu"), None, strategy.backbone, BATCH))
    strategy.after_experience(source_exp)
    if start is not None:
        start(strategy)
    strategy.before_experience(tta_exp)
    return strategy


def _reference_model(model: nn.Sequential) -> nn.Sequential:
    copied = copy.deepcopy(model)
    copied.model_preprocess = None  # read by the methods that load source data
    return copied


def _adapt(strategy, x: torch.Tensor) -> torch.Tensor:
    with torch.enable_grad():
        return strategy.adapt(x)


def _float(x: torch.Tensor) -> torch.Tensor:
    return x.float() / 255


def _named(strategy) -> dict[str, torch.Tensor]:
    return dict(classifier(strategy.backbone, strategy.head).named_parameters())


def _assert_same_parameters(ours: dict, theirs: dict, source: dict | None = None) -> None:
    """Equal parameters (both dicts keyed like ``Sequential(backbone, head)``) up to Adam's float
    noise (see the module docstring: at most 4 or 0.5 % of a tensor's elements, by at most ``NOISE``);
    with ``source`` also the same set of parameters moved away from it."""
    assert ours.keys() == theirs.keys()
    for name, p in ours.items():
        p, q = p.detach(), theirs[name].detach()
        if name.endswith("attn.qkv.bias"):  # keys' bias: zero gradient, Adam steps on float noise
            d = p.shape[0] // 3
            assert (p[d : 2 * d] - q[d : 2 * d]).abs().max() <= NOISE, name
            p, q = torch.cat([p[:d], p[2 * d :]]), torch.cat([q[:d], q[2 * d :]])
        off = (p - q).abs() > CLOSE["atol"] + CLOSE["rtol"] * q.abs()
        assert int(off.sum()) <= max(4, p.numel() // 200) and (p - q).abs().max() <= NOISE, (name, int(off.sum()))
    if source is not None:
        moved = {n for n, p in ours.items() if not torch.equal(p, source[n])}
        assert moved == {n for n, p in theirs.items() if not torch.equal(p, source[n])} and moved


def _optimizer_state(optimizer, named: dict[str, torch.Tensor]) -> dict[str, dict]:
    names = {id(p): n for n, p in named.items()}
    return {names[id(p)]: optimizer.state[p] for group in optimizer.param_groups for p in group["params"] if optimizer.state.get(p)}


def _assert_same_optimizer_state(ours, ours_named, theirs, theirs_named) -> None:
    """Equal optimizer states: step counts to ``CLOSE``, each moment tensor within 1 % of its largest
    entry (plus ``atol``). The moments average gradients that float noise moves, and ROID's weighted
    losses amplify it: on an AMD EPYC with MKL five of a BatchNorm weight's 8 first moments differ by
    more than ``CLOSE`` (up to 4e-5 at magnitudes near 0.1), where an Intel machine stayed within it.
    The predictions, class prior and parameters keep their own, tighter checks."""
    a, b = _optimizer_state(ours, ours_named), _optimizer_state(theirs, theirs_named)
    assert a.keys() == b.keys() and a
    for name in a:
        assert a[name].keys() == b[name].keys(), name
        for key in a[name]:
            p, q = torch.as_tensor(a[name][key]), torch.as_tensor(b[name][key])
            q = q.to(p.dtype)
            if p.numel() == 1:
                torch.testing.assert_close(p, q, **CLOSE, msg=f"{name}.{key}")
                continue
            bound = CLOSE["atol"] + 0.01 * float(q.abs().max())
            assert float((p - q).abs().max()) <= bound, (name, key, float((p - q).abs().max()), bound)


def _params(module: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in module.named_parameters()}


# ------------------------------------------------------------------ defaults


def _defaults(name: str) -> dict:
    signature = inspect.signature(strategies.get(name).__init__)
    return {k: p.default for k, p in signature.parameters.items() if p.default is not inspect.Parameter.empty}


def test_defaults_are_the_cifar10_c_configs(bench):
    """Every default is ``cfgs/cifar10_c/<method>.yaml`` over ``conf.py`` (or a fixed behaviour of
    the reference code, asserted here from the config). Mutations checked: EATA
    ``entropy_factor`` 0.5, ``fisher_size`` 1000, LAME default ``knn``."""
    optim = {"lr": "OPTIM.LR", "momentum": "OPTIM.BETA"}

    def value(cfg, key):
        node = cfg
        for part in key.split("."):
            node = getattr(node, part)
        return node

    expected = {
        "tent": {**optim, "optimizer": "adam", "params": "norm"},
        "eata": {
            **optim,
            "optimizer": "adam",
            "entropy_factor": "EATA.MARGIN_E0",
            "redundancy_margin": "EATA.D_MARGIN",
            "fisher_alpha": "EATA.FISHER_ALPHA",
            "fisher_size": "SOURCE.NUM_SAMPLES",
            "fisher_batch_size": None,
        },
        "cotta": {
            **optim,
            "optimizer": "adam",
            "params": "all",
            "ema_momentum": "M_TEACHER.MOMENTUM",
            "restore_p": "COTTA.RST",
            "confidence_threshold": "COTTA.AP",
            "n_augmentations": "TEST.N_AUGMENTATIONS",
            "loss": "cross_entropy",
            "flip": 0.5,
        },
        "rmt": {
            **optim,
            "optimizer": "adam",
            "params": "all",
            "ema_momentum": "M_TEACHER.MOMENTUM",
            "lambda_ce_src": "RMT.LAMBDA_CE_SRC",
            "lambda_ce_trg": "RMT.LAMBDA_CE_TRG",
            "lambda_cont": "RMT.LAMBDA_CONT",
            "warmup_samples": "RMT.NUM_SAMPLES_WARM_UP",
            "temperature": "CONTRAST.TEMPERATURE",
            "projection_dim": "CONTRAST.PROJECTION_DIM",
            "source_batch_size": None,
            "flip": 0.5,
        },
        "lame": {"affinity": "LAME.AFFINITY", "knn": "LAME.KNN", "batch_statistics": False},
    }
    for method, fields in expected.items():
        cfg = bench.conf._CFG_DEFAULT.clone()
        cfg.defrost()
        cfg.merge_from_file(str(bench.root / "cfgs" / "cifar10_c" / f"{method}.yaml"))
        defaults = _defaults(method)
        for field, key in fields.items():
            want = value(cfg, key) if isinstance(key, str) and "." in key else key
            if field == "affinity":
                want = want.lower()  # the benchmark's "rbf" / "kNN" / "linear"
            assert defaults[field] == want, (method, field, defaults[field], want)
        # behaviours with no clpeft option: one step per batch, no weight decay, no reset per batch,
        # Adam's beta2 0.999 (clpeft's fixed value), the whole batch for sources (test batch size)
        assert cfg.OPTIM.STEPS == 1 and cfg.OPTIM.WD == 0.0 and not cfg.MODEL.EPISODIC
        assert cfg.MODEL.RESET_AFTER_NUM_UPDATES == 0
    assert cfg.CONTRAST.MODE == "all" and not cfg.LAME.FORCE_SYMMETRY  # clpeft's contrastive loss, affinity
    assert cfg.SOURCE.NUM_SAMPLES == -1  # RMT: every source sample (EATA's yaml sets 2000)
    assert cfg.OPTIM.NESTEROV and cfg.OPTIM.DAMPENING == 0.0 and cfg.OPTIM.MOMENTUM == 0.9  # clpeft's SGD


# ------------------------------------------------------------------ augmentation


@pytest.mark.parametrize(("channels", "size"), [(3, 32), (1, 28), (3, 8)])
def test_cotta_augmentation_equals_transforms_cotta(bench, channels, size):
    """Seeded alike, ``TTAugment`` draws and applies the reference's ``get_tta_transforms`` (one
    draw per batch: colour jitter in a random order with saturation and hue, edge padding,
    affine with whole-pixel shifts up to W/8, blur, crop, flip, noise), for RGB, grayscale (no
    saturation/hue) and tiny images (where the zero fill of the padded image reaches the crop).
    Mutations checked: contrast/saturation pivot = channel mean instead of luma, hue jitter
    dropped, translation 1/16 -> 1/8, the colour operations in a fixed order, rotation range halved."""
    x = torch.rand(5, channels, size, size, generator=torch.Generator().manual_seed(0))
    transform = bench.transforms.get_tta_transforms((size, size))
    torch.manual_seed(3)
    expected = [transform(x) for _ in range(6)]
    after_reference = torch.rand(3)
    torch.manual_seed(3)
    augment = TTAugment()
    got = augment.apply(x, augment.sample(6, x.shape)).view(6, *x.shape)
    assert torch.equal(torch.rand(3), after_reference)  # the same number of draws
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=2e-5)


def test_augmentation_average_equals_the_reference_loop(bench):
    """CoTTA's averaged teacher prediction, ``stack([teacher(transform(x)) for 32]).mean(0)`` with
    test-batch BatchNorm: clpeft's one stacked forward (vmap), its loop and its CPU default give
    the same. Mutation checked: leaving one augmentation out of the stacked or the CPU-default mean."""
    model = _source_model("cnn")
    model.eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.track_running_stats, m.running_mean, m.running_var = False, None, None
    x = _float(_images(BATCH, 5))
    transform = bench.transforms.get_tta_transforms((32, 32))
    with torch.no_grad():
        torch.manual_seed(11)
        expected = torch.stack([model(transform(x)) for _ in range(32)]).mean(0)
        for stacked in (True, False, None):  # None on a CPU: stacked augmentation, one forward each
            torch.manual_seed(11)
            got = augmentation_average(model, x, TTAugment(), 32, stacked=stacked)
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ losses


def test_losses_equal_utils_losses_and_the_contrastive_loss(bench):
    """Entropy, symmetric cross-entropy (RMT, CoTTA on ImageNet), CoTTA's CIFAR soft
    cross-entropy and RMT's contrastive loss (``RMT.contrastive_loss``, mode ``all``, on
    prototype / test / augmented views through the same projector). Mutations checked: symmetric
    weight 0.5 -> 0.4, a view counted as its own positive."""
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(8, CLASSES, generator=g), torch.randn(8, CLASSES, generator=g)
    torch.testing.assert_close(entropy(student), bench.losses.Entropy()(student))
    torch.testing.assert_close(symmetric_cross_entropy(student, teacher), bench.losses.SymmetricCrossEntropy()(student, teacher))
    torch.testing.assert_close(soft_cross_entropy(student, teacher), bench.cotta.softmax_entropy_cifar(student, teacher))
    torch.testing.assert_close(symmetric_cross_entropy(student, teacher), bench.cotta.softmax_entropy_imagenet(student, teacher))
    torch.manual_seed(1)
    projector = nn.Sequential(nn.Linear(6, 12), nn.ReLU(), nn.Linear(12, 12))
    views = torch.randn(8, 3, 6, generator=g)
    owner = types.SimpleNamespace(device="cpu", projector=projector, contrast_mode="all", temperature=0.1, base_temperature=0.1)
    expected = bench.rmt.RMT.contrastive_loss(owner, views)
    got = multi_view_contrastive_loss(nn.functional.normalize(projector(views), dim=-1), 0.1)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ source, norm, tent


def test_source_and_test_batch_normalisation_equal_source_and_bntest(bench):
    """``source`` = ``Source`` (running statistics), ``bn_adapt`` = ``BNTest`` (test-batch
    statistics). Mutation checked: ``bn_adapt`` on source statistics."""
    model = _source_model("cnn", head_scale=3.0)
    with torch.no_grad():  # source statistics that differ from the test batches'
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    for method, reference in [("source", bench.source.Source), ("bn_adapt", bench.norm.BNTest)]:
        strategy = _clpeft(method, "cnn", model)
        ref = reference(_cfg(bench, "source" if method == "source" else "norm_test"), _reference_model(model), CLASSES)
        for i in range(2):
            x = _images(BATCH, 10 + i)
            torch.testing.assert_close(_adapt(strategy, x), ref(_float(x)), **CLOSE)


@pytest.mark.parametrize("kind", ["cnn", "vit"])
def test_tent_equals_the_reference(bench, kind):
    """Adam on the BatchNorm / LayerNorm affine parameters, test-batch statistics, the pre-update
    prediction; outputs, parameters and Adam's moments after three batches. Mutations checked:
    returning the post-update prediction; LayerNorm left out of the norm layers (ViT)."""
    model = _source_model(kind, head_scale=3.0)
    strategy = _clpeft("tent", kind, model)
    ref = bench.tent.Tent(_cfg(bench, "tent"), _reference_model(model), CLASSES)
    for i in range(3):
        x = _images(BATCH, 20 + i)
        torch.testing.assert_close(_adapt(strategy, x), ref(_float(x)), **CLOSE)
    ours, theirs = _named(strategy), dict(ref.model.named_parameters())
    _assert_same_parameters(ours, theirs, _params(model))
    _assert_same_optimizer_state(strategy.adaptation.optimizer._optimizer, ours, ref.optimizer, theirs)


def test_tent_sgd_is_the_imagenet_configs_nesterov_sgd(bench):
    """``cfgs/imagenet_c/tent.yaml``: SGD lr 2.5e-4 with ``conf.py``'s momentum 0.9, Nesterov,
    no dampening. Parameter updates and momentum buffers after three batches (updates compared,
    the parameters barely move at this rate). Mutation checked: plain (non-Nesterov) momentum."""
    model = _source_model("cnn", head_scale=3.0)
    strategy = _clpeft("tent", "cnn", model, optimizer="sgd", lr=0.00025)
    cfg = _cfg(bench, "tent", "imagenet_c")
    assert (cfg.OPTIM.METHOD, cfg.OPTIM.LR, cfg.OPTIM.MOMENTUM) == ("SGD", 0.00025, 0.9)
    ref = bench.tent.Tent(cfg, _reference_model(model), CLASSES)
    for i in range(3):
        x = _images(BATCH, 30 + i)
        torch.testing.assert_close(_adapt(strategy, x), ref(_float(x)), **CLOSE)
    source = _params(model)
    ours, theirs = _named(strategy), dict(ref.model.named_parameters())
    for name in ours:
        torch.testing.assert_close(ours[name] - source[name], theirs[name] - source[name], rtol=1e-4, atol=1e-9)
    _assert_same_optimizer_state(strategy.adaptation.optimizer._optimizer, ours, ref.optimizer, theirs)


# ------------------------------------------------------------------ eata


def _recording_batches(strategy, log: list) -> None:
    """Record every batch ``strategy.batches`` yields as ``(shuffle, batch)``."""
    batches = strategy.batches

    def recording(view, batch_size=None, shuffle=False, shard=False):
        for batch in batches(view, batch_size, shuffle, shard):
            log.append((shuffle, batch))
            yield batch

    strategy.batches = recording


@pytest.mark.parametrize(
    ("dataset", "options"),
    [
        ("cifar10_c", {}),
        ("cifar10_c", {"EATA.FISHER_ALPHA": 1e5}),  # a regulariser that matters on this tiny net
        ("imagenet_c", {}),  # SGD 2.5e-4, epsilon 0.05, beta 2000
    ],
)
def test_eata_equals_the_reference(bench, dataset, options):
    """Fisher weights and anchors from the same 48 source samples in batches of the test batch size
    (the reference asks its loader for exactly that), the entropy margin ``0.4 ln C``, the
    reliable and selected counts, the moving probability vector, outputs, parameters and
    optimizer state after four batches. The network's head is sharpened and centred so that
    some samples are reliable and some of those redundant, in every batch. Mutations checked:
    entropy factor 0.4 -> 0.5, Fisher divided by samples instead of mini-batches, Fisher batches of
    64, the moving average's decay 0.9 -> 0.8."""
    cfg = _cfg(bench, "eata", dataset, **{"SOURCE.NUM_SAMPLES": 48, **options})
    params = {
        "fisher_size": 48,
        "fisher_alpha": cfg.EATA.FISHER_ALPHA,
        "redundancy_margin": cfg.EATA.D_MARGIN,
        "lr": cfg.OPTIM.LR,
        "optimizer": cfg.OPTIM.METHOD.lower(),
    }
    model = _source_model("cnn", head_scale=60.0, centred=True)
    log = []
    strategy = _clpeft("eata", "cnn", model, _stream(64), start=lambda s: _recording_batches(s, log), **params)
    assert len(log) == 3 and all(len(b.y) == BATCH for _, b in log)
    bench.source = [(b.x, b.y) for _, b in log]
    ref = bench.eata.EATA(cfg, _reference_model(model), CLASSES)
    assert bench.request["batch_size"] == BATCH and bench.request["num_samples"] == 48
    assert ref.e_margin == pytest.approx(strategy.filter.entropy_margin) == pytest.approx(0.4 * math.log(CLASSES))
    assert ref.d_margin == strategy.filter.redundancy_margin
    term = strategy.penalty.terms[0]
    assert {f"backbone.{n[2:]}" if n.startswith("0.") else f"head.{n[2:]}" for n in ref.fishers} == set(term)
    for name, (fisher, anchor) in ref.fishers.items():
        ours = term[f"backbone.{name[2:]}" if name.startswith("0.") else f"head.{name[2:]}"]
        torch.testing.assert_close(ours[1], fisher, rtol=1e-5, atol=1e-12)  # FisherPenalty terms: (anchor, weight)
        torch.testing.assert_close(ours[0], anchor, rtol=0, atol=0)
    selected = []
    select = strategy.filter.select
    strategy.filter.select = lambda logits: (lambda out: (selected.append(int(out[0].sum())), out)[1])(select(logits))
    reliable = 0
    for i in range(4):
        x = _images(BATCH, 40 + i)
        out = _adapt(strategy, x)
        torch.testing.assert_close(out, ref(_float(x)), **CLOSE)
        reliable += int((entropy(out) < strategy.filter.entropy_margin).sum())
        torch.testing.assert_close(strategy.filter.moving_probs, ref.current_model_probs, **CLOSE)
    assert ref.num_samples_update_1 == reliable and ref.num_samples_update_2 == sum(selected)
    assert 0 < sum(selected) < reliable < 4 * BATCH  # both filters were active
    assert sum(selected[1:]) > 0  # the moving average was updated after its start (its decay 0.9 matters)
    ours, theirs = _named(strategy), dict(ref.model.named_parameters())
    _assert_same_parameters(ours, theirs, _params(model))
    _assert_same_optimizer_state(strategy.adaptation.optimizer._optimizer, ours, ref.optimizer, theirs)


# ------------------------------------------------------------------ cotta


def _recording_rand(monkeypatch) -> list:
    """Record every ``torch.rand`` draw (augmentation flips, restore masks)."""
    draws, rand = [], torch.rand

    def recording(*args, **kwargs):
        out = rand(*args, **kwargs)
        draws.append(out.clone())
        return out

    monkeypatch.setattr(torch, "rand", recording)
    return draws


@pytest.mark.parametrize(("kind", "head_scale", "augmented"), [("cnn", 1.0, True), ("cnn", 60.0, False), ("vit", 1.0, True)])
def test_cotta_equals_the_reference(bench, monkeypatch, kind, head_scale, augmented):
    """Three batches with the CIFAR-10-C config (augmentation averaging below the anchor
    confidence 0.92, or the teacher's plain prediction above it): the teacher's predictions, every
    random draw (flips, restore masks), student, teacher and optimizer after the last batch. On
    the ViT the class token and position embedding stay fixed (the reference adapts weights and
    biases only). 8 augmentations instead of 32 on both sides, for time (32 is the default
    checked above and averaged in :func:`test_augmentation_average_equals_the_reference_loop`).
    Mutations checked: restore before the teacher update, the restore mask ``u > 1 - p`` (same
    rate, other elements), ``all`` adapting every parameter again (ViT), teacher momentum 0.99,
    the confident branch predicting with the anchor."""
    model = _source_model(kind, head_scale)
    strategy = _clpeft("cotta", kind, model, n_augmentations=8)
    ref = bench.cotta.CoTTA(_cfg(bench, "cotta", **{"TEST.N_AUGMENTATIONS": 8}), _reference_model(model), CLASSES)
    draws = _recording_rand(monkeypatch)
    for i in range(3):
        x = _images(BATCH, 50 + i)
        with torch.no_grad():
            confidence = strategy.anchor(x).softmax(1).max(1).values.mean()
        assert (confidence < strategy.confidence_threshold) == augmented
        draws.clear()
        torch.manual_seed(100 + i)
        out = _adapt(strategy, x)
        ours_draws = draws[:]
        draws.clear()
        torch.manual_seed(100 + i)
        torch.testing.assert_close(out, ref(_float(x)), **CLOSE)
        assert len(ours_draws) == len(draws) and all(torch.equal(a, b) for a, b in zip(ours_draws, draws))
        draws.clear()
    ours, theirs = _named(strategy), dict(ref.model.named_parameters())
    _assert_same_parameters(ours, theirs, _params(model))
    teacher = dict(strategy.teacher.model.named_parameters())
    _assert_same_parameters(teacher, dict(ref.model_ema.named_parameters()))
    _assert_same_optimizer_state(strategy.adaptation.optimizer._optimizer, ours, ref.optimizer, theirs)
    if kind == "vit":
        for name in ("0.net.cls_token", "0.net.pos_embed"):
            assert torch.equal(ours[name], _params(model)[name])
    restored = sum(int((ours[n] == model_p).sum()) for n, model_p in _params(model).items())
    assert restored > 0  # the restore masks took effect


def test_cotta_imagenet_config_symmetric_loss_and_sgd(bench):
    """``cfgs/imagenet_c/cotta.yaml`` (not a CIFAR dataset: the symmetric loss; SGD lr 0.01,
    Nesterov; restore 0.001; anchor threshold 0.1, never reached by 10 classes) equals
    ``loss: symmetric, optimizer: sgd, lr: 0.01, restore_p: 0.001, confidence_threshold: 0.1``.
    Mutation checked: the loss options swapped."""
    model = _source_model("cnn", head_scale=3.0)
    cfg = _cfg(bench, "cotta", "imagenet_c")
    strategy = _clpeft(
        "cotta",
        "cnn",
        model,
        loss="symmetric",
        optimizer="sgd",
        lr=cfg.OPTIM.LR,
        restore_p=cfg.COTTA.RST,
        confidence_threshold=cfg.COTTA.AP,
    )
    ref = bench.cotta.CoTTA(cfg, _reference_model(model), CLASSES)
    for i in range(3):
        x = _images(BATCH, 60 + i)
        torch.manual_seed(200 + i)
        out = _adapt(strategy, x)
        torch.manual_seed(200 + i)
        torch.testing.assert_close(out, ref(_float(x)), **CLOSE)
    ours, theirs = _named(strategy), dict(ref.model.named_parameters())
    _assert_same_parameters(ours, theirs, _params(model))
    _assert_same_optimizer_state(strategy.adaptation.optimizer._optimizer, ours, ref.optimizer, theirs)


# ------------------------------------------------------------------ rmt


@pytest.mark.parametrize("kind", ["cnn", "vit"])
def test_rmt_equals_the_reference(bench, monkeypatch, tmp_path, kind):
    """40 source samples (3 batches of the test batch size per pass): the prototypes from one
    shuffled pass, the warm-up (4 steps, crossing a pass, linear learning-rate ramp), then three
    test batches with self-training, contrastive and source-replay losses: prototypes, warmed-up
    student and teacher, each step's loss and ensemble prediction, every parameter (student,
    teacher, projection head) and the optimizer state.

    clpeft's RMT augments with ``TTAugment()`` (checked), which equals the reference's transform
    to 2e-5 per pixel (:func:`test_cotta_augmentation_equals_transforms_cotta`); here it is given
    the reference's transform itself, because seven Adam steps on gradients of the augmented
    batch amplify that pixel noise on a few near-zero-gradient weights to ~1e-4 (measured; with
    the reference's transform every parameter agrees to 5e-6). Mutations checked: an unshuffled
    prototype pass, source batches of 8, ``lambda_cont`` 0.5, the student's prediction alone."""
    model = _source_model(kind)
    cfg = _cfg(bench, "rmt", **{"RMT.NUM_SAMPLES_WARM_UP": 64, "CKPT_DIR": str(tmp_path)})
    log = []
    strategy = _clpeft("rmt", kind, model, start=lambda s: _recording_batches(s, log), warmup_samples=64)
    assert isinstance(strategy.augment, TTAugment) and vars(strategy.augment) == vars(TTAugment())
    transform = bench.transforms.get_tta_transforms((32, 32))
    strategy.augment = lambda x: transform(_float(x))
    warmed = {"student": _named(strategy), "teacher": dict(strategy.teacher.model.named_parameters())}
    warmed = {k: {n: p.detach().clone() for n, p in v.items()} for k, v in warmed.items()}
    projector = copy.deepcopy(strategy.contrast.projector.state_dict())
    losses = []
    step = strategy.adaptation.step
    monkeypatch.setattr(strategy.adaptation, "step", lambda loss: (losses.append(loss.detach()), step(loss)))
    outputs = []
    for i in range(3):
        torch.manual_seed(300 + i)
        outputs.append(_adapt(strategy, _images(BATCH, 70 + i)))
    prototype_pass = [(b.x, b.y) for shuffled, b in log if shuffled]
    stream = [(b.x, b.y) for shuffled, b in log if not shuffled]
    assert len(prototype_pass) == 3 and len(stream) == 4 + 3
    bench.source = SourceLoader([stream[:3], prototype_pass, stream[3:6], stream[6:]], BATCH)

    ref = bench.rmt.RMT(cfg, _reference_model(model), CLASSES)
    assert bench.request["batch_size"] == BATCH and bench.request["num_samples"] == -1
    torch.testing.assert_close(strategy.contrast.prototypes.means().float(), ref.prototypes_src.squeeze(1), rtol=1e-5, atol=1e-6)
    _assert_same_parameters(warmed["student"], dict(ref.model.named_parameters()))
    _assert_same_parameters(warmed["teacher"], dict(ref.model_ema.named_parameters()))
    with torch.no_grad():
        ref.projector.load_state_dict(projector)  # both drew theirs at random, at different times
    ref_losses = []
    calculation = ref.loss_calculation
    ref.loss_calculation = lambda x: (lambda out: (ref_losses.append(out[1].detach()), out)[1])(calculation(x))
    for i in range(3):
        torch.manual_seed(300 + i)
        torch.testing.assert_close(outputs[i], ref(_float(_images(BATCH, 70 + i))), **CLOSE)
    torch.testing.assert_close(torch.stack(losses), torch.stack(ref_losses), **CLOSE)
    ours, theirs = _named(strategy), dict(ref.model.named_parameters())
    _assert_same_parameters(ours, theirs, _params(model))
    _assert_same_parameters(dict(strategy.teacher.model.named_parameters()), dict(ref.model_ema.named_parameters()))
    _assert_same_parameters(dict(strategy.contrast.projector.named_parameters()), dict(ref.projector.named_parameters()))
    ours.update({f"projector.{n}": p for n, p in strategy.contrast.projector.named_parameters()})
    theirs.update({f"projector.{n}": p for n, p in ref.projector.named_parameters()})
    _assert_same_optimizer_state(strategy.adaptation.optimizer._optimizer, ours, ref.optimizer, theirs)


# ------------------------------------------------------------------ lame


@pytest.mark.parametrize("kind", ["cnn", "vit"])
@pytest.mark.parametrize("affinity", ["kNN", "rbf", "linear"])
def test_lame_equals_the_reference(bench, kind, affinity):
    """The Laplacian-adjusted probabilities of three batches, source normalisation statistics,
    for each affinity of the benchmark (``LAME.AFFINITY``; ``KNN`` 5; rbf's bandwidth the mean
    distance to the 5th nearest feature, itself included: ``LAME.SIGMA`` is passed to the
    reference's ``rbf_affinity`` but never read, so clpeft has no such option). Mutations checked: rbf bandwidth from
    the 6th distance, the kNN graph including the point itself, linear affinity of unnormalised features."""
    model = _source_model(kind, head_scale=3.0)
    strategy = _clpeft("lame", kind, model, affinity=affinity.lower())
    ref = bench.lame.LAME(_cfg(bench, "lame", **{"LAME.AFFINITY": affinity}), _reference_model(model), CLASSES)
    for i in range(3):
        x = _images(BATCH, 80 + i)
        expected = ref(_float(x))
        got = _adapt(strategy, x).exp()
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)
        with torch.no_grad():
            plain = model.eval()(_float(x)).softmax(1)
        assert (got - plain).abs().max() > 1e-3  # the adjustment did something
