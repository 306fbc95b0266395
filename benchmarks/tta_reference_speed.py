"""Test-time adaptation throughput and peak memory: clpeft against Döbler et al.'s benchmark code.

Döbler, Marsden, Yang, "Robust Mean Teacher for Continual and Gradual Test-Time Adaptation", CVPR
2023 (https://arxiv.org/abs/2211.13081), ships the benchmark code that the reference tests
(``tests/reference/test_tta_*.py``) prove clpeft's TTA strategies equal to:
``shared/refs/test-time-adaptation/classification``. This script imports that code the same way
(its ``conf`` and ``methods`` with stubs for the imports the tested path never uses; nothing of
it is copied) and, for every method both sides have, runs clpeft's ``adapt`` and the reference
method's ``forward`` side by side in one process on

* the same model: the small BatchNorm CNN (``cnn`` backbone, widths 8/16) on 3 x 32 x 32 images,
  10 classes (``--model vit``: timm's ``test_vit``), the same initial weights (the head sharpened
  per method as in the reference tests, so that the filters of EATA, SAR, DeYO select samples);
* the same batches (``--batch-size`` 64, ``--batches`` per round; clpeft gets ``uint8`` images as
  from the engine, the reference floats in [0, 1] as from its loaders, converted inside its timed
  call), torch's generator seeded alike before each batch so random draws match;
* the reference configs ``cfgs/cifar10_c/<method>.yaml`` over ``conf.py`` (clpeft's defaults).

Timing: one untimed warm-up round (both sides batch by batch), then ``--repeats`` rounds
alternating which side goes first; each side keeps adapting across rounds (the same stream on
both). The table gives images per second from the median CPU time of a round
(``time.process_time``: all threads of this process, which other processes on a loaded shared
machine disturb far less than wall time) and the ratio of the wall-time medians as well. On CUDA
both use wall time after ``torch.cuda.synchronize``.

Agreement: after the reference tests' length of run (3 batches, in the warm-up round) every
parameter of the two sides must pass those tests' rule (at most 4 or 0.5 % of a tensor's elements
beyond ``rtol 1e-4, atol 1e-5``, none beyond 1e-2: Adam's float noise on near-zero gradients; the
ViT's attention-key bias, whose gradient is zero, only bounded), and after the last round no
element may differ by more than 1e-2. The end's largest difference is printed too: float noise
grows with every step where every parameter adapts (CoTTA, RMT: up to 7e-4 after 30 batches, also
with the reference's own augmentation in clpeft), while a wrong setting moves elements by whole
steps (~1e-3) from the first batch on. Methods without parameter updates (``source``,
``bn_adapt``, ``lame``) compare the predictions of the 3rd and the last batch. So the timings
compare the same computation.

Peak memory (after the method's timing, in the same process, one side at a time): the model,
batches and, for the reference, clpeft's strategy that serves it its source data are built; then
``malloc_trim(0)`` hands the allocator's free pages back to the kernel (so no freed page is reused
unseen), ``5`` written to ``/proc/self/clear_refs`` resets the kernel's peak resident set size
(``VmHWM``) to the current one, and the side is built and runs one round: its peak is ``VmHWM``
minus the resident size before building. That counts everything the side allocates (tensors,
autograd graph, optimizer state, model copies, Python objects, allocator slack) from the same
baseline for both sides; library code is already paged in by the timing (a fresh process would
count the pages of torch's code it touches first). ``ru_maxrss`` cannot be reset and torch's CPU
allocator keeps no peak statistic. On CUDA: ``torch.cuda.max_memory_allocated`` after
``reset_peak_memory_stats``, minus the allocation before building. Repeated runs spread by a few
MB.

Setup differences that do not touch the timed per-batch work: source-data methods get a source
set of ``--source-samples`` images (EATA's Fisher samples, RMT's and SANTA's prototype pass, RMT's
warm-up of ``2 x batch size`` samples instead of 50,000 and its replay, served to the reference's
``get_source_loader`` as the batches clpeft drew; their random projection heads, and
AdaContrast's random initial queue, are loaded with clpeft's); MEMO runs point by point on both
sides, 8 points a batch (the reference's config: test batch size 1), the reference making its AugMix views with its own
``AugMixAugmenter`` inside its timed call (in its pipeline the data loader's work); AdaContrast's
reference gets the views ``ContrastiveViews`` draws (its data loader's work), drawn inside its
timed call by the same code clpeft uses.

    OMP_NUM_THREADS=1 python benchmarks/tta_reference_speed.py --threads 1
    python benchmarks/tta_reference_speed.py --methods tent,eata --batches 2 --repeats 1
    python benchmarks/tta_reference_speed.py --model vit --no-memory
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import copy
import ctypes
import ctypes.util
import dataclasses
import datetime
import gc
import importlib
import io
import math
import os
import platform
import re
import statistics
import sys
import tempfile
import time
import types
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn

from clpeft.backbones.cnn import CNNBackbone
from clpeft.backbones.timm_backbone import TimmBackbone
from clpeft.components.heads.classifiers import LinearHead
from clpeft.components.tta.contrastive_views import ContrastiveViews
from clpeft.components.tta.online_adaptation import classifier
from clpeft.data import ArrayDataset, DataView
from clpeft.data_access import DataAccess
from clpeft.experience import Experience
from clpeft.registry import strategies

SHAPE = (3, 32, 32)
CLASSES = 10
CLOSE = {"rtol": 1e-4, "atol": 1e-5}  # the reference tests' tolerance
NOISE = 1e-2  # their bound of Adam's float-noise steps
CHECKED_BATCHES = 3  # their length of run
REFERENCE = "test-time-adaptation"
SUBDIR = "classification"
REFERENCE_MODULES = ("tent", "eata", "cotta", "rmt", "lame", "source", "norm", "sar", "deyo", "memo", "rotta", "roid", "rpl", "cmf")
REFERENCE_MODULES += ("santa", "adacontrast")


@dataclasses.dataclass(frozen=True)
class Case:
    """One row: clpeft's ``strategy`` with ``params`` against ``methods.<module>.<cls>`` with ``cfgs/cifar10_c/<config>.yaml``."""

    strategy: str
    module: str
    cls: str
    config: str
    params: dict = dataclasses.field(default_factory=dict)
    head_scale: float = 3.0
    centred: bool = False
    source: bool = False  # reads the source data (served to the reference's get_source_loader)
    updates: bool = True  # changes parameters (else the predictions are compared)
    batch_size: int | None = None  # images per batch if not ``--batch-size``


CASES = {
    "source": Case("source", "source", "Source", "source", updates=False),
    "bn_adapt": Case("bn_adapt", "norm", "BNTest", "norm_test", updates=False),
    "bn_adapt:alpha": Case("bn_adapt", "norm", "BNAlpha", "norm_alpha", {"statistics": "alpha"}, updates=False),
    "bn_adapt:ema": Case("bn_adapt", "norm", "BNEMA", "norm_ema", {"statistics": "ema"}, updates=False),
    "lame": Case("lame", "lame", "LAME", "lame", updates=False),
    "tent": Case("tent", "tent", "Tent", "tent"),
    "eata": Case("eata", "eata", "EATA", "eata", head_scale=60.0, centred=True, source=True),
    "rdumb": Case("rdumb", "eata", "EATA", "rdumb", head_scale=60.0, centred=True),
    "sar": Case("sar", "sar", "SAR", "sar", head_scale=6.0),
    "deyo": Case("deyo", "deyo", "DeYO", "deyo", head_scale=16.0, centred=True),
    "rpl": Case("rpl", "rpl", "RPL", "rpl"),
    "roid": Case("roid", "roid", "ROID", "roid"),
    "cmf": Case("cmf", "cmf", "CMF", "cmf"),
    "rotta": Case("rotta", "rotta", "RoTTA", "rotta"),
    "cotta": Case("cotta", "cotta", "CoTTA", "cotta", head_scale=1.0),
    "rmt": Case("rmt", "rmt", "RMT", "rmt", head_scale=1.0, source=True),
    "santa": Case("santa", "santa", "SANTA", "santa", source=True),
    "adacontrast": Case("adacontrast", "adacontrast", "AdaContrast", "adacontrast"),
    "memo": Case("memo", "memo", "MEMO", "memo", batch_size=8),  # 8 points, each adapted alone on 32 views
}

NOT_COMPARED = {
    "adanpc": "not in the reference benchmark (classification/methods has no AdaNPC)",
    "gtta, tpt, vte, ttaug": "the reference's, not clpeft's (GTTA needs style-transferred source data; TPT and VTE prompt CLIP)",
}


# ------------------------------------------------------------------ the reference code


def reference_root() -> Path | None:
    """The benchmark's ``classification`` folder: in ``$CLPEFT_REFS``, else in the first ``shared/refs``
    beside the repository or one of its parents; None where there is none."""
    here = Path(__file__).resolve().parent
    roots = [Path(os.environ["CLPEFT_REFS"])] if os.environ.get("CLPEFT_REFS") else [p / "shared" / "refs" for p in (here, *here.parents)]
    return next((r / REFERENCE / SUBDIR for r in roots if (r / REFERENCE / SUBDIR).is_dir()), None)


def _stub(name: str, path: Path | None = None, **attributes) -> types.ModuleType:
    module = types.ModuleType(name)
    module.__dict__.update(attributes)
    if path is not None or not attributes:
        module.__path__ = [str(path)] if path is not None else []
    return module


def _reference_class(path: Path, name: str, **scope):
    """One class of a reference file compiled alone (``models/model.py`` imports every model family)."""
    node = next(n for n in ast.parse(path.read_text()).body if isinstance(n, ast.ClassDef) and n.name == name)
    namespace = {"torch": torch, "nn": nn, **scope}
    exec(compile(ast.Module([node], []), str(path), "exec"), namespace)
    return namespace[name]


@contextlib.contextmanager
def reference_benchmark() -> Iterator[types.SimpleNamespace]:
    """The benchmark's ``conf``, method modules and AugMix, importable for the block.

    Stubs stand in for the packages' ``__init__`` (which import every method), ``models.model``
    (only ``split_up_model``, here of ``Sequential(backbone, head)``, and AdaContrast's
    ``BaseModel``), ``datasets.data_loading`` (``get_source_loader`` serves ``ns.source``) and
    ``iopath``; everything imported in the block leaves ``sys.modules`` afterwards.
    """
    root = reference_root()
    if root is None:
        raise SystemExit(f"reference code {REFERENCE} not found: set CLPEFT_REFS to the shared/refs folder")
    ns = types.SimpleNamespace(root=root, source=None)

    def split_up_model(model, arch_name, dataset_name):
        return model[0], model[1]

    stubs = {
        "methods": _stub("methods", root / "methods"),
        "utils": _stub("utils", root / "utils"),
        "augmentations": _stub("augmentations", root / "augmentations"),
        "models": _stub("models"),
        "models.model": _stub(
            "models.model",
            split_up_model=split_up_model,
            ResNetDomainNet126=type("ResNetDomainNet126", (), {}),
            BaseModel=_reference_class(root / "models" / "model.py", "BaseModel", split_up_model=split_up_model),
        ),
        "datasets": _stub("datasets"),
        "datasets.data_loading": _stub("datasets.data_loading", get_source_loader=lambda **request: (None, ns.source)),
        "iopath": _stub("iopath"),
        "iopath.common": _stub("iopath.common"),
        "iopath.common.file_io": _stub("iopath.common.file_io", g_pathmgr=None),
    }
    tops = {"conf", "methods", "utils", "augmentations", "models", "datasets", "iopath"}
    shadowed = {n: m for n, m in sys.modules.items() if n.partition(".")[0] in tops}
    for name in shadowed:
        del sys.modules[name]
    before, saved_path = set(sys.modules), list(sys.path)
    sys.path.insert(0, str(root))
    sys.modules.update(stubs)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # the losses' torch.jit.script
            ns.conf = importlib.import_module("conf")
            ns.methods = {name: importlib.import_module(f"methods.{name}") for name in REFERENCE_MODULES}
            ns.augmix = importlib.import_module("augmentations.transforms_augmix")
        for name in ("rmt", "santa"):  # their prototype pass's progress bar
            ns.methods[name].tqdm = _stub("tqdm", tqdm=lambda iterable, *args, **kwargs: iterable)
        yield ns
    finally:
        sys.path[:] = saved_path
        for name in set(sys.modules) - before:
            del sys.modules[name]
        sys.modules.update(shadowed)


def reference_cfg(bench, config: str, batch_size: int, **options):
    """``conf.py``'s defaults merged with ``cfgs/cifar10_c/<config>.yaml`` and ``options``."""
    cfg = bench.conf._CFG_DEFAULT.clone()
    cfg.defrost()
    cfg.merge_from_file(str(bench.root / "cfgs" / "cifar10_c" / f"{config}.yaml"))
    cfg.TEST.BATCH_SIZE = batch_size
    cfg.merge_from_list([x for key, value in options.items() for x in (key, value)])
    return cfg


class SourceLoader:
    """Stand-in for the reference's source ``DataLoader``: the ``k``-th ``iter()`` serves ``passes(k)``."""

    def __init__(self, passes: Callable[[int], Iterator], batch_size: int, length: int):
        self.passes, self.batch_size, self.length, self.count = passes, batch_size, length, 0

    def __iter__(self):
        self.count += 1
        return iter(self.passes(self.count - 1))

    def __len__(self) -> int:
        return self.length


# ------------------------------------------------------------------ model, data, clpeft


def images(n: int, seed: int) -> torch.Tensor:
    """Smooth random ``uint8`` images (a 4 x 4 pattern upsampled, plus noise), as the reference tests'."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(n, 3, 4, 4, generator=g)
    x = nn.functional.interpolate(coarse, size=SHAPE[1:], mode="bilinear", align_corners=False)
    return ((x + 0.1 * torch.randn(x.shape, generator=g)).clamp(0, 1) * 255).round().to(torch.uint8)


def backbone(kind: str) -> nn.Module:
    if kind == "cnn":
        return CNNBackbone(SHAPE, widths=[8, 16])
    return TimmBackbone(SHAPE, model="test_vit", img_size=SHAPE[-1], freeze=False)


def source_model(kind: str, case: Case) -> nn.Sequential:
    """The random source network, its head sharpened (and centred on the test features) per method."""
    torch.manual_seed(0)
    net = backbone(kind)
    head = LinearHead(net.feature_dim, CLASSES)
    scale = 8.0 if case.strategy == "deyo" and kind == "vit" else case.head_scale
    with torch.no_grad():
        head.weight.mul_(scale)
        if case.centred and kind == "cnn":
            mean = copy.deepcopy(net).train()(images(64, 99)).mean(0)
            head.bias.copy_(-(head.weight @ mean))
    return classifier(net, head)


def clpeft_strategy(case: Case, kind: str, model: nn.Sequential, source: DataView, batch_size: int, device, extra: dict):
    """clpeft's strategy on ``model``'s weights after the source phase, at the test domain's start;
    returns it and the batches it read during that start (``(shuffled, batch)``)."""
    classes = list(range(CLASSES))
    source_exp = Experience(0, source, None, classes, classes)
    tta_exp = Experience(1, None, None, [], classes)
    tta_exp.past = (source_exp,)
    strategy = strategies.get(case.strategy)(backbone(kind), **case.params, **extra)
    strategy.before_experience(source_exp)
    strategy.backbone.load_state_dict(model[0].state_dict())
    strategy.head.load_state_dict(model[1].state_dict())
    strategy.to(device)
    strategy.attach(DataAccess(device, None, strategy.backbone, batch_size))
    strategy.after_experience(source_exp)
    log, batches = [], strategy.batches

    def recording(view, batch_size=None, shuffle=False, shard=False):
        for batch in batches(view, batch_size, shuffle, shard):
            log.append((shuffle, batch))
            yield batch

    strategy.batches = recording
    strategy.before_experience(tta_exp)
    del strategy.batches
    return strategy, log


def _source_epoch(strategy, view: DataView, seed: int, epoch: int, batch_size: int):
    """Epoch ``epoch`` of clpeft's ``SourceBatches`` (order ``randperm`` seeded ``seed + epoch``)."""
    order = torch.randperm(len(view), generator=torch.Generator().manual_seed(seed + epoch))
    for i in range(0, len(view), batch_size):
        batch = next(iter(strategy.batches(view.take(order[i : i + batch_size]), batch_size)))
        yield batch.x, batch.y


# ------------------------------------------------------------------ the two sides


@dataclasses.dataclass
class Side:
    """One side of a row: ``step(seed, x)`` adapts on a batch and returns its prediction."""

    step: Callable[[int, torch.Tensor], torch.Tensor]
    parameters: Callable[[], dict[str, torch.Tensor]]
    keep: object = None  # what must stay alive with it


def prepare(case: Case, kind: str, n_source: int) -> tuple[nn.Sequential, DataView]:
    """The source model and the source data of ``case``."""
    source = DataView.of(ArrayDataset(images(n_source, 1), torch.arange(n_source) % CLASSES, "source"))
    return source_model(kind, case), source


def clpeft_pair(case: Case, kind: str, model, source: DataView, batch_size: int, device) -> tuple[object, list]:
    """clpeft's strategy for ``case`` (with the options the reduced setup needs) and its start's batches."""
    extra = {"fisher_size": len(source)} if case.strategy == "eata" else {}
    if case.strategy == "rmt":
        extra = {"warmup_samples": 2 * batch_size}
    torch.manual_seed(0)  # AdaContrast's random initial queue
    return clpeft_strategy(case, kind, model, source, batch_size, device, extra)


def build_pair(case: Case, kind: str, batch_size: int, n_source: int, device) -> dict[str, Side]:
    """Both sides of ``case`` on the same source model, weights and source data."""
    model, source = prepare(case, kind, n_source)
    strategy, log = clpeft_pair(case, kind, model, source, batch_size, device)
    return {
        "clpeft": _clpeft_side(case, strategy),
        "reference": _reference_side(case, model, strategy, log, source, batch_size, device),
    }


def _clpeft_side(case: Case, strategy) -> Side:
    def step(seed: int, x: torch.Tensor) -> torch.Tensor:
        with torch.enable_grad():
            if case.strategy != "memo":
                torch.manual_seed(seed)
                return strategy.adapt(x)
            outputs = []
            for j, image in enumerate(x):  # point by point, seeded as the reference's loader
                torch.manual_seed(seed * 1000 + j)
                strategy.augmix.seed(seed * 1000 + j)
                outputs.append(strategy.adapt(image[None]))
            return torch.cat(outputs)

    return Side(step, lambda: dict(classifier(strategy.backbone, strategy.head).named_parameters()), strategy)


def _reference_side(case: Case, model, strategy, log, source: DataView, batch_size: int, device) -> Side:
    import numpy as np
    from torchvision.transforms import ToTensor
    from torchvision.transforms.functional import to_pil_image

    bench = BENCH
    ckpt = tempfile.TemporaryDirectory()  # RMT's and SANTA's prototype and warm-up files: never reused
    options = {"CKPT_DIR": ckpt.name}
    if case.strategy == "eata":
        options["SOURCE.NUM_SAMPLES"] = len(source)
    if case.strategy == "rmt":
        options["RMT.NUM_SAMPLES_WARM_UP"] = 2 * batch_size
    if case.strategy == "memo":
        options["TEST.BATCH_SIZE"] = 1
    cfg = reference_cfg(bench, case.config, batch_size, **options)
    net = copy.deepcopy(model)
    if case.strategy == "adacontrast":  # its BaseModel wants an nn.Linear head
        head = nn.Linear(model[1].weight.shape[1], CLASSES)
        head.load_state_dict(model[1].state_dict())
        net = nn.Sequential(net[0], head)
    if case.strategy in ("adacontrast", "rotta") or case.config == "norm_ema":
        # the reference's models are plain modules whose train() its code relies on (clpeft's
        # Backbone.train keeps a backbone without trainable parameters, such as a teacher, in eval)
        net[0].train = types.MethodType(nn.Module.train, net[0])
    net.model_preprocess = None
    net.to(device)
    per_epoch = math.ceil(len(source) / batch_size)
    if case.strategy == "eata":
        fisher = [(b.x, b.y) for _, b in log]
        bench.source = SourceLoader(lambda k: fisher, batch_size, len(fisher))
    elif case.strategy == "santa":
        shuffled = [(b.x, b.y) for s, b in log if s]
        bench.source = SourceLoader(lambda k: shuffled, batch_size, len(shuffled))
    elif case.strategy == "rmt":  # iter 0: warm-up and replay; 1: the prototype pass; then replay epochs
        shuffled, seed = [(b.x, b.y) for s, b in log if s], int(strategy.source_batches.seed)
        passes = {1: shuffled}
        bench.source = SourceLoader(
            lambda k: passes.get(k) or _source_epoch(strategy, source, seed, max(k - 1, 0), batch_size), batch_size, per_epoch
        )
    with contextlib.ExitStack() as stack:
        if case.strategy == "cmf" and not torch.cuda.is_available():  # its class prior's .cuda()
            stack.enter_context(_identity_cuda())
        stack.enter_context(contextlib.redirect_stdout(io.StringIO()))  # MEMO's "Found 6 modules to be replaced."
        ref = getattr(bench.methods[case.module], case.cls)(cfg, net, CLASSES)
    if case.strategy == "rotta":  # its forward_and_adapt passes an argument loss_calculation does not take
        ref.loss_calculation = lambda *_: type(ref).loss_calculation(ref)
    if case.strategy in ("rmt", "santa"):  # both drew their projection heads at random, at different times
        with torch.no_grad():
            ref.projector.load_state_dict(copy.deepcopy(strategy.contrast.projector.state_dict()))
    if case.strategy == "adacontrast":
        with torch.no_grad():
            ref.model.mem_feat.copy_(strategy.memory.keys)
            ref.model.mem_labels.copy_(strategy.memory.key_labels)

    def step(seed: int, x: torch.Tensor) -> torch.Tensor:
        if case.strategy == "memo":
            augmenter = bench.augmix.AugMixAugmenter(None, ToTensor(), "cifar10_c", n_views=cfg.TEST.N_AUGMENTATIONS, use_augmix=True)
            outputs = []
            for j, image in enumerate(x.cpu()):
                torch.manual_seed(seed * 1000 + j)
                np.random.seed(seed * 1000 + j)
                outputs.append(ref([v.unsqueeze(0).to(device) for v in augmenter(to_pil_image(image))]))
            return torch.cat(outputs)
        torch.manual_seed(seed)
        if case.strategy == "adacontrast":
            views = ContrastiveViews(tuple(x.shape[-2:]))(x)
            return ref([x.float() / 255, *views])
        return ref(x.float() / 255)

    def parameters() -> dict[str, torch.Tensor]:  # of the model it was given (MEMO wraps its BatchNorm layers in place)
        return {re.sub(r"\.layer\.(weight|bias)$", r".\1", n): p for n, p in net.named_parameters()}

    return Side(step, parameters, (ref, ckpt))


@contextlib.contextmanager
def _identity_cuda():
    cuda = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    try:
        yield
    finally:
        torch.Tensor.cuda = cuda


# ------------------------------------------------------------------ agreement


def parameter_difference(ours: dict, theirs: dict) -> tuple[float, bool]:
    """Largest absolute difference and the reference tests' rule (see the module docstring)."""
    if ours.keys() != theirs.keys():
        return math.inf, False
    worst, ok = 0.0, True
    for name, p in ours.items():
        p, q = p.detach().float().cpu(), theirs[name].detach().float().cpu()
        if name.endswith("attn.qkv.bias"):  # the keys' bias: zero gradient, Adam steps on float noise
            d = p.shape[0] // 3
            ok &= bool((p[d : 2 * d] - q[d : 2 * d]).abs().max() <= NOISE)
            p, q = torch.cat([p[:d], p[2 * d :]]), torch.cat([q[:d], q[2 * d :]])
        diff = (p - q).abs()
        off = diff > CLOSE["atol"] + CLOSE["rtol"] * q.abs()
        worst = max(worst, float(diff.max()))
        ok &= int(off.sum()) <= max(4, p.numel() // 200) and float(diff.max()) <= NOISE
    return worst, ok


def output_difference(case: Case, ours: torch.Tensor, theirs: torch.Tensor) -> tuple[float, bool]:
    ours = ours.exp() if case.strategy == "lame" else ours  # clpeft's LAME returns log-probabilities
    diff = (ours.detach().float().cpu() - theirs.detach().float().cpu()).abs()
    return float(diff.max()), bool(torch.allclose(ours.cpu(), theirs.cpu(), **CLOSE))


# ------------------------------------------------------------------ measuring


def _clock(device) -> tuple[float, float]:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return time.perf_counter(), time.perf_counter()
    return time.process_time(), time.perf_counter()


def _round(side: Side, batches: list[torch.Tensor], first_seed: int, device) -> tuple[float, float, torch.Tensor]:
    cpu0, wall0 = _clock(device)
    for i, x in enumerate(batches):
        out = side.step(first_seed + i, x)
    cpu1, wall1 = _clock(device)
    return cpu1 - cpu0, wall1 - wall0, out


def _difference(case: Case, pair: dict[str, Side], last: dict[str, torch.Tensor]) -> tuple[float, bool]:
    if case.updates:
        return parameter_difference(pair["clpeft"].parameters(), pair["reference"].parameters())
    return output_difference(case, last["clpeft"], last["reference"])


def time_case(name: str, kind: str, n_batches: int, batch_size: int, repeats: int, n_source: int, device) -> dict:
    """Images per second (median of ``repeats`` alternating rounds after a warm-up) and agreement:
    by the reference tests' rule after their length of run (3 batches, in the warm-up round), and
    at the end no element beyond their noise bound (float noise grows with every Adam step)."""
    case = CASES[name]
    pair = build_pair(case, kind, batch_size, n_source, device)
    batches = [images(case.batch_size or batch_size, 1000 + i).to(device) for i in range(n_batches)]
    last = {}
    for i, x in enumerate(batches):  # the warm-up round, batch by batch on both sides
        last = {side: pair[side].step(100 + i, x) for side in pair}
        if i + 1 == min(CHECKED_BATCHES, n_batches):
            early = _difference(case, pair, last)
    times = {side: {"cpu": [], "wall": []} for side in pair}
    for r in range(1, repeats + 1):
        for side in ["reference", "clpeft"] if r % 2 else ["clpeft", "reference"]:
            cpu, wall, last[side] = _round(pair[side], batches, 100 * (r + 1), device)
            times[side]["cpu"].append(cpu)
            times[side]["wall"].append(wall)
    row = {"method": name, "compared": "parameters" if case.updates else "outputs"}
    for side in pair:
        for clock in ("cpu", "wall"):
            row[f"{side}_{clock}_ips"] = n_batches * len(batches[0]) / statistics.median(times[side][clock])
    row["ratio"] = row["clpeft_cpu_ips"] / row["reference_cpu_ips"]
    row["wall_ratio"] = row["clpeft_wall_ips"] / row["reference_wall_ips"]
    row["early_difference"], early_agree = early
    row["difference"], end_agree = _difference(case, pair, last)
    row["agree"] = early_agree and (row["difference"] <= NOISE if case.updates else end_agree)
    return row


def _memory_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def peak_memory(name: str, side: str, kind: str, n_batches: int, batch_size: int, n_source: int, device) -> float:
    """Peak memory in MB of building ``side`` of ``name`` and running one round (see the module docstring)."""
    case = CASES[name]
    batches = [images(case.batch_size or batch_size, 1000 + i).to(device) for i in range(n_batches)]
    model, source = prepare(case, kind, n_source)
    if side == "reference":  # clpeft's strategy serves the reference its source data: built before the baseline
        strategy, log = clpeft_pair(case, kind, model, source, batch_size, device)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    else:
        ctypes.CDLL(ctypes.util.find_library("c")).malloc_trim(0)  # free heap pages go back: none is reused unseen
        base = _memory_kb("VmRSS") * 1024
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := VmRSS
    if side == "clpeft":
        built = _clpeft_side(case, clpeft_pair(case, kind, model, source, batch_size, device)[0])
    else:
        built = _reference_side(case, model, strategy, log, source, batch_size, device)
    _round(built, batches, 100, device)
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else _memory_kb("VmHWM") * 1024
    return (peak - base) / 2**20


BENCH = None  # the reference benchmark's modules while measure() runs


def measure(
    methods: list[str],
    kind: str = "cnn",
    n_batches: int = 5,
    batch_size: int = 64,
    repeats: int = 5,
    n_source: int = 256,
    memory: bool = True,
    device: str = "cpu",
    report: Callable[[dict], None] | None = None,
) -> list[dict]:
    """One row per method (see :func:`time_case`), with peak memory in MB per side when ``memory``."""
    global BENCH
    device = torch.device(device)
    rows = []
    with reference_benchmark() as BENCH, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            for name in methods:
                row = time_case(name, kind, n_batches, batch_size, repeats, n_source, device)
                for side in ("clpeft", "reference") if memory else ():  # after timing: code paths already paged in
                    row[f"{side}_peak_mb"] = peak_memory(name, side, kind, n_batches, batch_size, n_source, device)
                rows.append(row)
                if report is not None:
                    report(row)
        finally:
            BENCH = None
    return rows


def table(rows: list[dict]) -> str:
    """The Markdown table of :func:`measure`'s rows."""
    lines = [
        "| method | clpeft img/s | reference img/s | ratio (CPU) | ratio (wall) | clpeft peak MB | reference peak MB"
        f" | max difference after {CHECKED_BATCHES} batches / at the end |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        peaks = [f"{r[k]:.1f}" if k in r else "-" for k in ("clpeft_peak_mb", "reference_peak_mb")]
        agree = "agree" if r["agree"] else "DIFFER"
        lines.append(
            f"| {r['method']} | {r['clpeft_cpu_ips']:.0f} | {r['reference_cpu_ips']:.0f} | {r['ratio']:.2f} | {r['wall_ratio']:.2f}"
            f" | {peaks[0]} | {peaks[1]} | {r['early_difference']:.1e} / {r['difference']:.1e} ({r['compared']}), {agree} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", default=",".join(CASES), help="comma-separated rows (default: all)")
    parser.add_argument("--model", choices=["cnn", "vit"], default="cnn")
    parser.add_argument("--batches", type=int, default=5, help="batches per round")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5, help="timed rounds after one warm-up round")
    parser.add_argument("--source-samples", type=int, default=256)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-memory", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TQDM_DISABLE", "1")  # the reference's prototype pass
    methods = args.methods.split(",")
    unknown = set(methods) - set(CASES)
    if unknown:
        raise SystemExit(f"unknown methods {sorted(unknown)}; known: {', '.join(CASES)}")
    start = time.perf_counter()
    print(
        f"# TTA throughput vs {REFERENCE} ({datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC; {platform.processor() or platform.machine()},"
        f" {os.cpu_count()} cores, torch {torch.__version__}, {args.threads} thread(s), device {args.device}; model {args.model},"
        f" batch {args.batch_size}, {args.batches} batches x {args.repeats} rounds + 1 warm-up)",
        flush=True,
    )
    report = lambda r: print(f"  {r['method']}: ratio {r['ratio']:.2f} ({time.perf_counter() - start:.0f} s)", flush=True)  # noqa: E731
    rows = measure(
        methods, args.model, args.batches, args.batch_size, args.repeats, args.source_samples, not args.no_memory, args.device, report
    )
    print()
    print(table(rows))
    print()
    for name, reason in NOT_COMPARED.items():
        print(f"- not compared: {name}: {reason}")
    print(f"\n({time.perf_counter() - start:.0f} s)")


if __name__ == "__main__":
    main()
