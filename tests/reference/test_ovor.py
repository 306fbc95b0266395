"""OVOR against the official code, jpmorganchase/ovor (``shared/refs/ovor``).

Both sides run on the same tiny random ViT, 768 wide as the official code requires (its
``NPOS`` and ``_get_ood_samples`` hard-code 768 features), 5 blocks, 2 heads, at 32 px: the
reference's own ``models/vit.py`` ``VisionTransformer`` gets clpeft's weights. Compared: the
OnePrompt initialisation and prefixes (``models/zoo.py`` ``OnePrompt``), the full forward
(``ViTZoo.forward`` with ``prompt_flag='oneprompt'``), the outlier synthesis (``NPOS._generate``,
with faiss), the energy margin loss (``NPOS.loss``), and two tasks of the official learner's
regular and outlier epochs (``learners/default.py`` ``_train_one_epoch``,
``_train_one_epoch_ood``, ``init_optimizer`` with its ``CosineSchedule``) against the strategy's
steps with the engine's optimizer and ``quarter_cosine`` schedule: losses and every parameter.
The published setups are checked against the official configs and scripts.

Shims, from the test side: ``torch.Tensor.cuda`` returns a copy on the CPU and ``nn.Module.cuda``
the module; the official ``ViTZoo`` and learner build ViT-B/16 with downloaded weights and a GPU
``DataParallel``, so the tests assemble them around the tiny reference ViT without calling their
``__init__`` (``nn.DataParallel`` without a GPU calls the module); its logger is a stub that
counts nothing. faiss (``faiss-cpu``) must be installed: the official synthesis searches with it.
"""

from __future__ import annotations

import importlib
import os
import types
import warnings
from pathlib import Path

import pytest
import timm
import torch
from torch import nn

import clpeft.config
from clpeft.backbones.timm_backbone import TimmBackbone
from clpeft.components.heads.virtual_outliers import OutlierBatches, energy_margin_loss, synthesize_outliers
from clpeft.components.prompts.one_prompt import OnePrompt
from clpeft.config import TrainConfig
from clpeft.data import Batch
from clpeft.experience import Experience
from clpeft.strategies.ovor import OVOR
from clpeft.training import make_optimizer, make_scheduler, optimizer_step

WIDTH, DEPTH, G_LENGTH, E_LENGTH = 768, 5, 2, 4  # the official width; blocks; L_g and L_e (keys and values)
CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "ovor"


@pytest.fixture
def ref(load_reference, monkeypatch):
    """The reference's ``learners.default`` (with ``models.zoo``, ``models.vit``, ``learners.ood``)."""
    try:
        import faiss  # noqa: F401
    except ImportError:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("faiss-cpu is not installed: the official OVOR synthesis (learners/ood.py) searches with it")
        pytest.skip("faiss-cpu is not installed (the official OVOR synthesis needs it)")
    monkeypatch.setattr(torch.Tensor, "cuda", lambda self, *args, **kwargs: self.clone())
    monkeypatch.setattr(nn.Module, "cuda", lambda self, *args, **kwargs: self)
    with warnings.catch_warnings():  # its timm.models.layers / helpers / registry imports are deprecated
        warnings.simplefilter("ignore", FutureWarning)
        with load_reference("ovor", "learners.default") as default:
            yield types.SimpleNamespace(
                default=default,
                prompt=importlib.import_module("learners.prompt"),
                ood=importlib.import_module("learners.ood"),
                zoo=importlib.import_module("models.zoo"),
                vit=importlib.import_module("models.vit"),
            )


def _backbone() -> TimmBackbone:
    """A frozen 768-wide ViT of 5 blocks at 32 px behind clpeft's timm backbone."""
    torch.manual_seed(0)
    backbone = TimmBackbone((3, 32, 32), model="test_vit", img_size=32, freeze=False)
    backbone.net = timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=16, embed_dim=WIDTH, depth=DEPTH, num_heads=2, mlp_ratio=0.25, num_classes=0
    )
    backbone.feature_dim = WIDTH
    backbone.freeze()
    return backbone


def _reference_vit(ref, backbone: TimmBackbone) -> nn.Module:
    net = ref.vit.VisionTransformer(img_size=32, patch_size=16, embed_dim=WIDTH, depth=DEPTH, num_heads=2, mlp_ratio=0.25)
    net.load_state_dict(backbone.net.state_dict(), strict=True)
    return net.eval()


def _reference_prompt(ref):
    """The official ``OnePrompt`` as ``ViTZoo`` builds it: ``prompt_param = [tasks, L_e, L_g]``."""
    return ref.zoo.OnePrompt(WIDTH, 2, [2, E_LENGTH, G_LENGTH], key_dim=WIDTH)


def _images(seed: int, n: int = 6) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=generator)


# ---------------------------------------------------------------------------------- OnePrompt


def test_one_prompt_initialisation_and_prefixes_equal_the_official_module(ref):
    """Seeded alike, ``OnePrompt`` draws the official prompts (uniform in ``[0, 1)``, G-layers
    first), and its prefixes are ``OnePrompt.forward(q, l, x)``'s ``[Pk, Pv]`` at every layer
    (none at layer 5 and beyond). Exact. Mutations checked: drawing the E-prompts first, and
    ``uniform_(-1, 1)``, fail it."""
    torch.manual_seed(3)
    official = _reference_prompt(ref)
    torch.manual_seed(3)
    ours = OnePrompt(WIDTH, [0, 1], [2, 3, 4], G_LENGTH, E_LENGTH)
    for i, layer in enumerate(official.g_layers):
        assert torch.equal(ours.g_prompt[i], getattr(official, f"g_p_{layer}"))
    for i, layer in enumerate(official.e_layers):
        assert torch.equal(ours.e_prompt[i], getattr(official, f"e_p_{layer}"))
    prefixes = ours()
    tokens = torch.randn(3, 4, WIDTH)
    for layer in range(DEPTH + 1):
        expected, loss, same = official.forward(torch.zeros(3, WIDTH), layer, tokens, train=True)
        assert loss == 0 and same is tokens
        if expected is None:
            assert layer not in prefixes
            continue
        for got, want in zip(prefixes[layer], expected):
            assert torch.equal(got.expand_as(want), want)


def _strategy(backbone: TimmBackbone, **options) -> OVOR:
    return OVOR(backbone, g_length=G_LENGTH, e_length=E_LENGTH, **options)


def _reference_model(ref, backbone: TimmBackbone, strategy: OVOR, n_classes: int):
    """The official ``ViTZoo`` (``oneprompt``) around the tiny reference ViT, holding the strategy's prompts."""
    model = ref.zoo.ViTZoo.__new__(ref.zoo.ViTZoo)
    nn.Module.__init__(model)
    model.feat = _reference_vit(ref, backbone)
    model.last = nn.Linear(WIDTH, n_classes)
    model.prompt = _reference_prompt(ref)
    model.prompt_flag = "oneprompt"
    with torch.no_grad():
        for i, layer in enumerate(model.prompt.g_layers):
            getattr(model.prompt, f"g_p_{layer}").copy_(strategy.prompt.g_prompt[i])
        for i, layer in enumerate(model.prompt.e_layers):
            getattr(model.prompt, f"e_p_{layer}").copy_(strategy.prompt.e_prompt[i])
    return model


def test_full_forward_equals_the_official_model(ref):
    """``OVOR.predict`` is ``ViTZoo.forward`` with one prompt (no query pass: its query is zeros).

    The official model gets preprocessed images (its transforms normalise outside the model).
    Tolerance: 1e-5 absolute on the logits. Mutation checked: swapping the key and value halves in
    ``OnePrompt.forward`` fails it."""
    backbone = _backbone()
    strategy = _strategy(backbone)
    strategy.before_experience(Experience(0, None, None, [0, 1, 2], [0, 1, 2]))
    model = _reference_model(ref, backbone, strategy, 3)
    with torch.no_grad():
        model.last.weight.copy_(strategy.head.weight)
        model.last.bias.copy_(strategy.head.bias)
    x = _images(5)
    strategy.eval()
    with torch.no_grad():
        torch.testing.assert_close(strategy.predict(x), model(backbone.preprocess(x)), rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------- virtual outliers


def _npos(ref, **config):
    return ref.ood.NPOS({"K": 7, "sample_from": 30, "select": 12, "cov": 0.1, "num_per_class": 9, **config})


@pytest.mark.parametrize("n_features", [40, 200])
def test_outlier_synthesis_equals_npos_generate(ref, n_features):
    """``synthesize_outliers`` (``around='origin'``) is the official ``NPOS._generate``: the same
    rows in the same order (farthest first), given the same seeded Gaussian offsets.

    Its ``k``-th neighbour distances come from faiss in float32, clpeft's from float64: rankings
    agree on these random features (no near-ties). Exact on the rows. Mutations checked: ranking by
    the nearest instead of the ``k``-th neighbour, keeping the nearest candidates, and not
    normalising the features fail it."""
    torch.manual_seed(4)
    features = torch.randn(n_features, WIDTH) * 3 + 1
    npos = _npos(ref)
    n_classes = 4
    torch.manual_seed(5)
    expected = npos._generate(features, n_classes)
    torch.manual_seed(5)
    offsets = torch.randn(30, WIDTH)
    got = synthesize_outliers(features, offsets, 9 * n_classes, k=7, select=12, scale=0.1)
    assert got.shape == expected.shape == (36, WIDTH)
    assert torch.equal(got, expected)


def test_outliers_around_boundary_points_are_offsets_from_the_farthest_features(ref):
    """The paper's synthesis (``around='boundary'``), which the official code leaves out: every
    outlier is a boundary feature (largest ``k``-th neighbour distance) plus ``sigma`` times one of
    the offsets, and the kept ones are the farthest of all such candidates (recomputed directly)."""
    torch.manual_seed(6)
    features = torch.randn(50, WIDTH)
    offsets = torch.randn(20, WIDTH)
    got = synthesize_outliers(features, offsets, 25, k=5, select=8, scale=0.5, around="boundary")
    unit = features / features.norm(dim=1, keepdim=True)
    kth = lambda p: torch.cdist(p.double(), unit.double()).square().sort(dim=1).values[:, 4]  # noqa: E731
    boundary = kth(unit).argsort(descending=True)[:8]
    candidates = torch.stack([features[b] + 0.5 * o for b in boundary for o in offsets])
    expected = candidates[kth(candidates).argsort(descending=True)[:25]]
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("huber", [True, False])
def test_energy_margin_loss_equals_npos_loss(ref, huber):
    """``lambda * energy_margin_loss`` is ``NPOS.loss``'s first value (Huber or MSE), with logits
    whose energies fall on both sides of both thresholds. Tolerance 1e-6 relative. Mutation
    checked: the sign of the outlier energy flipped fails it."""
    torch.manual_seed(7)
    id_logits, ood_logits = torch.randn(16, 5) * 8 + 6, torch.randn(11, 5) * 3
    npos = _npos(ref, lmda=0.3, thres_id=-8.0, thres_ood=-2.0, huber=huber)
    expected, id_score, ood_score = npos.loss(id_logits, ood_logits)
    assert expected > 0 and (-torch.logsumexp(id_logits, 1) > -8).any() and (-torch.logsumexp(ood_logits, 1) < -2).any()
    got = 0.3 * energy_margin_loss(id_logits, ood_logits, -8.0, -2.0, huber=huber)
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)


# ---------------------------------------------------------------------------------- training


class _Meter:
    """The official logger's meters, reduced to the values added to them."""

    def __init__(self):
        self.values = []

    def reset(self):
        pass

    def add(self, value, n=1):
        self.values.append(value)


def _reference_learner(ref, model, lr: float, epochs: list[int]):
    """The official ``OnePrompt`` learner around ``model`` (its ``__init__`` builds ViT-B/16 on a GPU)."""
    learner = ref.prompt.OnePrompt.__new__(ref.prompt.OnePrompt)
    nn.Module.__init__(learner)
    learner.model = nn.DataParallel(model)  # no GPU: calls the module
    learner.opt_cfg = {"optimizer": "Adam", "lr": lr, "momentum": 0.9, "weight_decay": 0, "scheduler": "cosine"}
    learner.epochs = epochs
    learner.criterion = nn.CrossEntropyLoss()
    meters = {name: _Meter() for name in ("train_loss", "train_acc", "memory", "id_score", "ood_score")}
    learner.logger = types.SimpleNamespace(step=0, get_memory_usage=lambda: 0, **meters)
    learner.ood = _npos(ref, K=5, sample_from=40, select=6, num_per_class=8, lmda=0.5, thres_id=-1.0, thres_ood=1.0)
    return learner


def _double_loaders(learner, captured: dict):
    """Wrap the official ``generate`` so that its loaders hold float64 tensors (the model is float64);
    the ID batches it shuffled are kept in ``captured``."""
    generate = learner.ood.generate

    def wrapped(in_dist, subset_start=0):
        id_loader, ood_loader = generate(in_dist, subset_start)
        captured["id"] = [(ids.double(), targets) for ids, targets in id_loader]
        return captured["id"], [[oods[0].double()] for oods in ood_loader]

    learner.ood.generate = wrapped


def _official_order(batches, features: torch.Tensor) -> torch.Tensor:
    """The permutation of ``features`` that the official ID batches hold (matched row by row)."""
    rows = torch.cat([ids for ids, _ in batches])
    return torch.cdist(rows, features).argmin(dim=1)


def test_training_equals_the_official_learner_across_tasks_and_outlier_epochs(ref):
    """Two tasks of official ``epochs: [0, 2, 1]``: two regular epochs then one outlier epoch each.

    The official side runs ``init_optimizer`` (Adam, betas ``(0.9, 0.999)``, its ``CosineSchedule``
    over the three epochs), ``_train_one_epoch`` (CE of the logits masked to the task, prompts and
    head trained) and ``_train_one_epoch_ood`` (features of the training data, ``NPOS`` outliers,
    CE plus the energy margin on the head alone). clpeft's side: the engine's ``make_optimizer``,
    ``make_scheduler`` (``quarter_cosine``) and ``optimizer_step`` around ``before_epoch`` and
    ``training_step``, with the same seed before the outlier synthesis, and the ID order the
    official loader drew. Compared: every loss, and the prompts and head after each task (the
    prompts do not move in the outlier epoch on either side). Float64. Tolerances: 1e-9 relative on
    losses, 1e-8 absolute on parameters. Mutations checked: ``outlier_weight`` ignored in the
    outlier step, and the prompts trained in it, fail it."""
    lr, epochs, per_task = 0.01, [0, 2, 1], 3
    options = dict(regular_epochs=2, outlier_weight=0.5, id_energy_threshold=-1.0, outlier_energy_threshold=1.0)
    options |= dict(neighbours=5, offsets=40, boundary_points=6, outliers_per_class=8)
    backbone = _backbone().double()
    strategy = _strategy(backbone, **options).double()
    model = _reference_model(ref, backbone, strategy, 2 * per_task).double()
    learner = _reference_learner(ref, model, lr, epochs)
    captured: dict = {}
    _double_loaders(learner, captured)
    train = TrainConfig(epochs=sum(epochs), lr=lr, optimizer="adam", schedule="quarter_cosine")
    for task in range(2):
        classes = list(range(per_task * task, per_task * (task + 1)))
        exp = Experience(task, None, None, classes, list(range(per_task * (task + 1))))
        strategy.before_experience(exp)
        strategy.double()
        with torch.no_grad():
            model.last.weight[classes] = strategy.head.weight[classes]
            model.last.bias[classes] = strategy.head.bias[classes]
        learner.subset_start, learner.subset_end = classes[0], classes[-1] + 1
        x, y = _images(10 + task, 12), torch.tensor(classes * 4)
        loader = [(backbone.preprocess(x), y, None)]
        strategy.batches = lambda view, **kwargs: iter([Batch(x, y)])
        learner.init_optimizer()
        optimizer = make_optimizer(strategy.param_groups(lr), train)
        scheduler = make_scheduler(optimizer, train, steps_per_epoch=1)
        for epoch in range(sum(epochs)):
            strategy.train()
            strategy.epoch = epoch
            seed = 100 * task + epoch
            torch.manual_seed(seed)
            if epoch < epochs[1]:
                learner._train_one_epoch(loader, epoch)
            else:
                learner._train_one_epoch_ood(loader, epoch)
            torch.manual_seed(seed)
            strategy.before_epoch(exp, epoch)
            if epoch >= epochs[1]:  # the official loader's shuffle, replayed
                features, labels = strategy._features
                order = _official_order(captured["id"], features)
                assert torch.equal(labels[order], torch.cat([t for _, t in captured["id"]]))
                strategy._outliers = OutlierBatches(features, labels, strategy._outliers.outliers, order)
            assert optimizer.param_groups[0]["lr"] == pytest.approx(learner.optimizer.param_groups[0]["lr"], abs=1e-12)
            loss = strategy.training_step(Batch(x, y))
            assert loss.item() == pytest.approx(learner.logger.train_loss.values[-1], rel=1e-9)
            optimizer_step(optimizer, loss, None)
            scheduler.step()
        official = model.prompt
        for i, layer in enumerate(official.g_layers):
            torch.testing.assert_close(strategy.prompt.g_prompt[i], getattr(official, f"g_p_{layer}"), rtol=0, atol=1e-8)
        for i, layer in enumerate(official.e_layers):
            torch.testing.assert_close(strategy.prompt.e_prompt[i], getattr(official, f"e_p_{layer}"), rtol=0, atol=1e-8)
        torch.testing.assert_close(strategy.head.weight, model.last.weight[: classes[-1] + 1], rtol=0, atol=1e-8)
        torch.testing.assert_close(strategy.head.bias, model.last.bias[: classes[-1] + 1], rtol=0, atol=1e-8)


# ---------------------------------------------------------------------------------- published setups

# jpmorganchase/ovor configs/common.yaml (not in shared/refs, which holds the code only): optimizer, schedule,
# batch and the ood block; experiments/<dataset>.sh: --prompt_param 10 40 10 --epochs 0 E1 E2.
OFFICIAL_COMMON = {"optimizer": "Adam", "lr": 0.001, "momentum": 0.9, "weight_decay": 0, "batch_size": 128, "scheduler": "cosine"}
OFFICIAL_OOD = {"lmda": 0.1, "cov": 0.1, "thres_id": -15.0, "thres_ood": -3.0}
OFFICIAL_RUNS = {"cifar100_10t.yaml": ([0, 16, 4], 100), "imagenet_r_10t.yaml": ([0, 40, 10], 200)}


@pytest.mark.parametrize("ours", sorted(OFFICIAL_RUNS))
def test_published_configs_are_the_official_setup(ref, ours):
    """``configs/ovor/{cifar100,imagenet_r}_10t.yaml`` hold what the official scripts run: the
    OnePrompt lengths (``--prompt_param 10 40 10``: L_e 40, L_g 10) at its fixed layers, the
    epochs split ``[0, E1, E2]``, Adam at 0.001 with beta1 0.9 and no weight decay, batch 128, its
    ``CosineSchedule`` over all epochs (clpeft's ``quarter_cosine``), every outlier setting (the ood
    block of ``common.yaml`` and ``NPOS``'s own defaults for the rest, read from ``learners/ood.py``),
    unnormalised [0, 1] inputs, no batch dropped (its ``split_dataset`` loader), float32, and ten
    tasks of equal size in the natural class order. Mutation checked: ``regular_epochs: 15`` fails it."""
    (warmup, regular, outlier), n_classes = OFFICIAL_RUNS[ours]
    cfg = clpeft.config.load(CONFIGS / ours)
    train, strategy, scenario, backbone = cfg.train, cfg.strategy.params, cfg.scenario.params, cfg.backbone.params
    npos = ref.ood.NPOS(OFFICIAL_OOD)
    prompt = ref.zoo.OnePrompt(WIDTH, 10, [10, 40, 10])
    assert warmup == 0 and (strategy["regular_epochs"], train.epochs) == (regular, regular + outlier)
    assert (strategy["e_length"], strategy["g_length"]) == (prompt.e_p_length, prompt.g_p_length)
    assert (strategy["g_layers"], strategy["e_layers"]) == (prompt.g_layers, prompt.e_layers)
    assert (train.optimizer, train.lr, train.weight_decay, train.batch_size) == ("adam", 0.001, 0, OFFICIAL_COMMON["batch_size"])
    param = torch.nn.Parameter(torch.zeros(1))
    assert make_optimizer([{"params": [param]}], train).defaults["betas"] == (OFFICIAL_COMMON["momentum"], 0.999)
    assert train.schedule == "quarter_cosine" and not train.drop_last and train.amp == "off"
    assert train.augment == "crop_flip_coda"
    assert (strategy["outlier_weight"], strategy["outlier_scale"]) == (npos.lmda, npos.cov_mat)
    assert (strategy["id_energy_threshold"], strategy["outlier_energy_threshold"]) == (npos.thres_id, npos.thres_ood)
    assert (strategy["neighbours"], strategy["offsets"], strategy["boundary_points"]) == (npos.K, npos.sample_from, npos.select)
    assert (
        strategy["outliers_per_class"] == npos.per_class
        and strategy.get("huber", True)
        and strategy.get("outliers_around", "origin") == "origin"
    )
    assert (backbone["mean"], backbone["std"]) == ([0, 0, 0], [1, 1, 1])
    assert backbone["model"] == "vit_base_patch16_224.augreg_in21k_ft_in1k" and backbone["pretrained"]
    assert scenario["n_experiences"] == 10 and scenario.get("class_order") is None and scenario.get("init_classes") is None
    if n_classes == 200:
        assert backbone["crop_pct"] == 0.875 and scenario["dataset_options"]["image_size"] == 256
