"""MOS against LAMDA-PILOT's official code (``shared/refs/pilot``: ``models/mos.py``, ``backbone/vit_mos.py``).

PILOT's functions are called on stand-ins for the objects they read (its learner and ViT are
assembled around tiny tensors without their ``__init__``, which downloads ViT-B/16), with the same
seeded tensors on both sides. Compared:

* the adapter (``vit_mos.Adapter``, ``lora`` init, no layer norm, scale 0.1) and the merge of eq. 5
  (``sum_adapter_param`` then ``reweight_adapter``) over three tasks;
* the prototype contrast (``Learner.orth_loss``), with and without stored class means;
* the self-refined adapter retrieval and the ensemble (``Learner._eval_cnn``): the whole ranking of
  the classes for every test sample, with the merge at test time off on PILOT's side (its
  ``reweight_adapter`` would otherwise move the stored adapters on every call: the difference
  ``strategies/mos.py`` documents);
* the strategy over two tasks against PILOT's learner and ``vit_mos`` ViT on the tiny random ViT of
  ``test_pilot.py`` (``beta = 0``, no alignment): SGD steps, class statistics, prototypes, the
  predictions' rankings, and the passes through the blocks each side makes;
* the published configs against ``exps/mos*.json``.

DUCT is proven equal to PILOT in ``test_pilot_duct.py``.
"""

from __future__ import annotations

import json
import types
from functools import partial

import numpy as np
import pytest
import torch
from torch import nn

import clpeft.config
from clpeft.components.heads.self_refined_retrieval import ensemble, self_refined_logits
from clpeft.components.lora.adapter_bank import AdapterBank
from clpeft.components.lora.adapter_merging import merge_towards_mean, start_from_last
from clpeft.components.lora.parallel_adapter import Adapter
from clpeft.components.regularization.prototype_contrast import prototype_contrast
from clpeft.strategies.mos import MOS

from .test_pilot import (
    BATCH,
    CONFIGS,
    LR,
    TASKS,
    WEIGHT_DECAY,
    _attached,
    _backbone,
    _close,
    _experience,
    _loader,
    _pilot_keys,
    _predict,
    _task_data,
    _test_inputs,
    _train_steps,
    pilot_modules,
)
from .test_pilot import WIDTH as VIT_WIDTH
from .test_pilot_breadth import _BlockPasses

WIDTH, BOTTLENECK, BLOCKS = 16, 4, 2


@pytest.fixture
def pilot(load_reference):
    """PILOT's ``models.mos`` and ``backbone.vit_mos``."""
    with pilot_modules(load_reference, "models.mos", ("backbone.vit_mos",)) as modules:
        yield modules


def _pilot_adapter(pilot) -> nn.Module:
    """The adapter ``get_backbone`` builds for MOS (``utils/inc_net.py``: lora init, scale 0.1, no layer norm)."""
    return pilot.vit_mos.Adapter(
        None, d_model=WIDTH, bottleneck=BOTTLENECK, dropout=0.1, init_option="lora", adapter_scalar="0.1", adapter_layernorm_option="none"
    )


def _randomise(module: nn.Module) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p))


def _load(ours: Adapter, theirs: nn.Module) -> None:
    ours.load_state_dict({k: v for k, v in theirs.state_dict().items()})


def test_adapter_equals_pilots_and_merge_equals_reweight_adapter(pilot):
    """Same weights, same output (eval mode); then three tasks of adapters: PILOT's prefix sums of the
    frozen tasks 0 and 1 and ``reweight_adapter(cur, 2)`` give task 2's merged adapter, clpeft's
    ``merge_towards_mean`` over the bank's frozen stack the same; the new task's adapter starts as the
    last frozen one (``start_from_last``: PILOT never re-initialises ``cur_adapter``). Tolerance:
    1e-6. Mutation checked: the mean replaced by the last frozen adapter fails it."""
    torch.manual_seed(0)
    theirs = nn.ModuleList(_pilot_adapter(pilot) for _ in range(BLOCKS))
    ours = [Adapter(WIDTH, BOTTLENECK, 0.1, 0.1) for _ in range(BLOCKS)]
    x = torch.randn(3, 5, WIDTH)
    for a, b in zip(ours, theirs):
        _randomise(b)
        _load(a, b)
        torch.testing.assert_close(a.eval()(x), b.eval()(x, add_residual=False), rtol=0, atol=1e-6)
    beta = 0.3
    vit = types.SimpleNamespace(config=types.SimpleNamespace(adapter_momentum=beta), blocks=[None] * BLOCKS, cur_adapter=theirs)
    for name in ("down_weight_sum", "down_bias_sum", "up_weight_sum", "up_bias_sum"):
        setattr(vit, name, [[] for _ in range(BLOCKS)])
    banks = [AdapterBank(WIDTH, BOTTLENECK) for _ in range(BLOCKS)]
    for task in range(3):
        for bank, adapter in zip(banks, theirs):
            bank.new_adapter()
            start_from_last(bank)
            if task:
                torch.testing.assert_close(bank.current.down_proj.weight, adapter.down_proj.weight, rtol=0, atol=0)
            _randomise(adapter)  # the task's training
            _load(bank.current, adapter)
        if task < 2:
            pilot.vit_mos.VisionTransformer.sum_adapter_param(vit)
            for p in theirs.parameters():  # its sums hold the weights' storage; its next forward re-assigns ``.data``
                p.data = p.data.clone()
            for bank in banks:
                bank.freeze_current()
    merged = pilot.vit_mos.VisionTransformer.reweight_adapter(vit, theirs, 2)
    for bank, adapter in zip(banks, merged):
        merge_towards_mean(bank, beta)
        for key, value in adapter.state_dict().items():
            torch.testing.assert_close(bank.current.state_dict()[key], value, rtol=0, atol=1e-6)


@pytest.mark.parametrize("with_means", [False, True])
def test_prototype_contrast_equals_orth_loss(pilot, with_means):
    """``reg * prototype_contrast`` is ``Learner.orth_loss`` (the class means first, then the batch;
    cross-entropy of ``M M^T / 0.8`` against the diagonal). Tolerance 1e-6 relative. Mutation checked:
    the batch before the means fails it (``with_means``)."""
    torch.manual_seed(1)
    features, means = torch.randn(6, WIDTH), torch.randn(4, WIDTH)
    learner = types.SimpleNamespace(cls_mean={c: m for c, m in enumerate(means)} if with_means else {}, _device="cpu")
    learner.args = {"reg": 0.1}
    expected = pilot.mos.Learner.orth_loss(learner, features, torch.zeros(6, dtype=torch.long))
    got = 0.1 * prototype_contrast(features, means if with_means else None)
    assert got.item() == pytest.approx(expected.item(), rel=1e-6)


class _Network:
    """PILOT's ``MOSNet`` as ``_eval_cnn`` reads it, over precomputed features: ``inputs`` are sample indices."""

    def __init__(self, features: torch.Tensor, head: nn.Linear, prototypes: torch.Tensor):
        self.features, self.head, self.prototypes = features, head, prototypes
        self.backbone = self._backbone
        self.backbone.__func__.out_dim = features.shape[-1]

    def eval(self):
        return self

    def forward_orig(self, inputs):  # adapter 0's features against the prototypes (CosineLinear, sigma 1)
        f = self.features[inputs.long(), 0]
        return {"logits": nn.functional.normalize(f, dim=1) @ nn.functional.normalize(self.prototypes, dim=1).T}

    def _backbone(self, inputs, adapter_id=-1, train=False, fc_only=False):
        if fc_only:
            return {"logits": self.head(inputs)}
        return {"features": self.features[inputs.long(), adapter_id]}


@pytest.mark.parametrize("with_ensemble", [True, False])
def test_self_refined_retrieval_and_ensemble_equal_eval_cnn(pilot, with_ensemble):
    """Three tasks of three classes, 40 test samples: PILOT's ``_eval_cnn`` ranks every class (``topk``
    = all classes) as clpeft's ``self_refined_logits`` (+ ``ensemble``) do, from the same features of
    every adapter, head and adapter-0 prototypes. Some samples change adapter once or more (checked),
    so the iteration is exercised. Exact on the rankings. Mutations checked: returning the logits of
    the last predicted task instead of the last evaluated one, and ``max_iterations`` 4 -> 3 fail it."""
    torch.manual_seed(2)
    n_tasks, per_task, n = 3, 3, 40
    classes = n_tasks * per_task
    features = torch.randn(n, n_tasks, WIDTH)
    head = nn.Linear(WIDTH, classes)
    prototypes = torch.randn(classes, WIDTH)
    task_of_class = torch.arange(classes) // per_task
    learner = types.SimpleNamespace(
        _network=_Network(features, head, prototypes),
        cls2task={c: int(task_of_class[c]) for c in range(classes)},
        _cur_task=n_tasks - 1,
        _total_classes=classes,
        ensemble=with_ensemble,
        topk=classes,
        _device="cpu",
    )
    loader = [(None, torch.arange(0, 20), None), (None, torch.arange(20, n), None)]
    loader = [(i, x, torch.zeros(len(x), dtype=torch.long)) for i, x, _ in loader]
    with torch.no_grad():
        expected, _ = pilot.mos.Learner._eval_cnn(learner, loader)
        first_guess = learner._network.forward_orig(torch.arange(n))["logits"]
        refined = self_refined_logits(head(features), first_guess, task_of_class)
        got = ensemble(refined, first_guess, n_tasks) if with_ensemble else refined
    assert (got.argsort(dim=1, descending=True).numpy() == expected).all()
    start = task_of_class[first_guess.argmax(1)]
    moved = (task_of_class[head(features)[torch.arange(n), start].argmax(1)] != start).sum()
    assert moved >= 5


# ---------------------------------------------------------------------------------- the strategy against PILOT's learner


def _pilot_mos_learner(pilot, backbone):
    """PILOT's MOS ``Learner`` and ``MOSNet`` around its ``vit_mos.VisionTransformer`` with ``backbone``'s
    weights (adapters bottleneck 8, ``adapter_momentum`` 0), without their ``__init__``s."""
    config = types.SimpleNamespace(
        ffn_adapt=True,
        ffn_option="parallel",
        ffn_adapter_layernorm_option="none",
        ffn_adapter_init_option="lora",
        ffn_adapter_scalar="0.1",
        ffn_num=8,
        d_model=VIT_WIDTH,
        adapter_momentum=0.0,
        vpt_on=False,
        vpt_num=0,
        _device="cpu",
    )
    vit = pilot.vit_mos.VisionTransformer(
        img_size=32, patch_size=16, embed_dim=VIT_WIDTH, depth=6, num_heads=2, mlp_ratio=3, qkv_bias=True, num_classes=4,
        norm_layer=partial(nn.LayerNorm, eps=1e-6), global_pool=False, drop_path_rate=0.0, tuning_config=config,
    )  # fmt: skip
    state = {k.replace(".adaptmlp.", "."): v for k, v in _pilot_keys(backbone.net.state_dict()).items()}
    missing, unexpected = vit.load_state_dict(state, strict=False)
    assert not unexpected and all(k.startswith(("cur_adapter.", "head.")) for k in missing)
    for name, p in vit.named_parameters():  # the factory's "freeze all but the adapter and head"
        p.requires_grad = "head" in name or "adapter" in name
    vit.out_dim = VIT_WIDTH
    net = pilot.mos.MOSNet.__new__(pilot.mos.MOSNet)
    nn.Module.__init__(net)
    net.backbone, net.fc, net._device = vit, None, "cpu"
    learner = pilot.mos.Learner.__new__(pilot.mos.Learner)
    learner._network, learner._device, learner._multiple_gpus = net, "cpu", []
    learner.cls_mean, learner.cls_cov, learner.cls2task = {}, {}, {}
    learner.batch_size, learner.init_lr, learner.weight_decay, learner.min_lr = BATCH, LR, WEIGHT_DECAY, 0.0
    learner.ensemble, learner.topk, learner._known_classes = True, 4, 0
    learner.args = {"optimizer": "sgd", "scheduler": "cosine", "tuned_epoch": 1, "reg": 0.1, "adapter_momentum": 0.0}
    learner.args["ca_storage_efficient_method"] = "covariance"
    return learner


class _DataManager:
    """``get_dataset`` of PILOT's data manager over clpeft-preprocessed images: ``(index, input, label)`` items."""

    def __init__(self, backbone, x: torch.Tensor, y: torch.Tensor):
        self.items = [(i, backbone.preprocess(x[i : i + 1])[0], y[i]) for i in range(len(y))]

    def get_dataset(self, classes, source, mode, ret_data=False):
        items = [item for item in self.items if int(item[2]) in set(np.asarray(classes).tolist())]
        return (None, None, items) if ret_data else items


def test_mos_training_statistics_and_predictions_equal_pilots_in_fewer_passes(pilot, monkeypatch):
    """MOS over two tasks with ``beta = 0`` (PILOT merges inside every forward, see ``strategies/mos.py``;
    eq. 5's merge is compared on its own above) and no alignment (PILOT samples with its own
    ``MultivariateNormal`` draws; the alignment is SLCA's, tested in ``test_slca.py``).

    Each task: PILOT's ``get_optimizer`` (adapters at lr, head at lr / 10, SGD, weight decay) and
    ``_init_train`` for one epoch against the engine's step (same dropout draws): cross-entropy over
    the task's classes plus ``0.1 x`` the prototype contrast with the stored class means (task 1);
    task 1's adapters start from task 0's on both sides. Then ``adapter_update``, ``_compute_mean``
    (class means and covariances + 1e-4 I of the new adapter's features) and ``replace_fc`` (the
    first adapter's class means) against ``after_experience``; finally ``_eval_cnn``'s ranking of the
    four classes for every test input (self-refined retrieval + ensemble) against ``predict``.
    Passes through the blocks, counted on the last block: one per training step on both sides;
    after a task PILOT makes one per class (``_compute_mean``) plus one per batch (``replace_fc``),
    clpeft one per batch over every adapter at once; a test batch costs PILOT ``t + 2`` passes and
    clpeft one. Tolerances: 1e-4 relative, 2e-5 absolute. Mutations checked: the head at the
    adapters' lr, the contrast weight 0.1 -> 0.2, and a fresh adapter per task each fail it."""
    loader = pilot.mos.DataLoader
    monkeypatch.setattr(pilot.mos, "DataLoader", lambda data, **kwargs: loader(data, **{**kwargs, "num_workers": 0}))
    backbone = _backbone()
    strategy = _attached(MOS(backbone, adapter_bottleneck=8, merge_beta=0.0, align_epochs=0))
    learner = _pilot_mos_learner(pilot, backbone)
    network, vit = learner._network, learner._network.backbone
    theirs, ours = _BlockPasses(vit.blocks[-1]), _BlockPasses(strategy.adapted.net.blocks[-1])
    for task in range(len(TASKS)):
        exp = _experience(task)
        strategy.before_experience(exp)
        xt, yt = _task_data(task)
        learner._cur_task, learner._total_classes = task, 2 * (task + 1)
        learner._known_classes = 2 * task
        learner.cls2task |= {c: task for c in TASKS[task]}
        network.update_fc(learner._total_classes)
        with torch.no_grad():
            if not task:
                for adapter, bank in zip(vit.cur_adapter, strategy.banks, strict=True):
                    adapter.load_state_dict(bank.current.state_dict())
            vit.head.weight[TASKS[task]] = strategy.head.weight[TASKS[task]]
            vit.head.bias[TASKS[task]] = strategy.head.bias[TASKS[task]]
        _train_steps(strategy, exp)
        optimizer = learner.get_optimizer(vit)
        torch.manual_seed(5)
        learner._init_train(_loader(backbone, xt, yt), None, optimizer, learner.get_scheduler(optimizer))
        steps = -(-len(yt) // BATCH)
        assert theirs.take() == ours.take() == (steps, len(yt))
        for adapter, bank in zip(vit.cur_adapter, strategy.banks, strict=True):
            for key, value in adapter.state_dict().items():
                _close(bank.current.state_dict()[key], value)
        _close(strategy.head.weight, vit.head.weight[: 2 * task + 2])

        strategy.after_experience(exp)
        vit.adapter_update()
        learner.data_manager = _DataManager(backbone, xt, yt)
        learner._compute_mean(vit)
        learner.train_dataset = types.SimpleNamespace(labels=yt.numpy())
        learner.train_loader_for_protonet = _loader(backbone, xt, yt)
        learner.replace_fc()
        assert theirs.take() == (len(TASKS[task]) + steps, 2 * len(yt)) and ours.take() == (steps, (task + 1) * len(yt))
        stats = strategy.alignment.stats
        for c in TASKS[task]:
            _close(stats.means()[c], learner.cls_mean[c])
            _close(stats.covariance(c) + 1e-4 * torch.eye(VIT_WIDTH, dtype=torch.float64), learner.cls_cov[c])
        _close(strategy.prototypes, network.fc.weight)
    x = _test_inputs()
    test_loader = [(None, backbone.preprocess(x), torch.zeros(len(x), dtype=torch.long))]
    with torch.no_grad():
        expected, _ = learner._eval_cnn(test_loader)
        assert theirs.take() == (len(TASKS) + 1, (len(TASKS) + 1) * len(x))
        got = _predict(strategy, x)
        assert ours.take() == (1, len(TASKS) * len(x))
    assert (got.argsort(dim=1, descending=True).numpy() == expected).all()


# ---------------------------------------------------------------------------------- published setups


@pytest.mark.parametrize("dataset, exps", [("cifar100", "mos.json"), ("imagenet_r", "mos_inr.json")])
def test_mos_published_configs_are_pilots_setup(pilot, dataset, exps):
    """``configs/mos/{cifar100,imagenet_r}_10t.yaml`` hold what ``exps/mos*.json`` runs: adapters
    (``ffn_num``), epochs, lr (the head at a tenth: ``get_optimizer``), batch, weight decay (also the
    alignment's: its parameter group overrides SGD's 5e-4), SGD, cosine to ``min_lr`` 0, ``reg``,
    ``adapter_momentum``, ``ensemble``, the covariance alignment (``crct_epochs``, ``ca_lr``, 5 x batch
    samples per class), class order 1993, the backbone and images as EASE's configs; ten tasks
    (CIFAR-100: B0 Inc10 with mos.json's settings, whose own split is B0 Inc5). Mutation checked:
    ``merge_beta: 0.2`` fails it."""
    official = json.loads((pilot.root / "exps" / exps).read_text())
    cfg = clpeft.config.load(CONFIGS / "mos" / f"{dataset}_10t.yaml")
    train, strategy, scenario, backbone = cfg.train, cfg.strategy.params, cfg.scenario.params, cfg.backbone.params
    assert scenario["n_experiences"] == 10 and scenario["class_order"] == official["seed"][0] == 1993
    assert official["init_cls"] == official["increment"] and (dataset == "cifar100" or official["increment"] == 20)
    assert official["backbone_type"] == "vit_base_patch16_224_mos" and official["ca_storage_efficient_method"] == "covariance"
    assert backbone["model"] == "vit_base_patch16_224.augreg_in21k_ft_in1k" and backbone["pretrained"]
    assert (backbone["mean"], backbone["std"], backbone["crop_pct"]) == ([0, 0, 0], [1, 1, 1], 0.875)
    assert train.amp == "off" and train.augment == "crop_flip"
    assert (train.epochs, train.lr, train.batch_size) == (official["tuned_epoch"], official["init_lr"], official["batch_size"])
    assert (train.optimizer, train.momentum, official["optimizer"]) == ("sgd", 0.9, "sgd")
    assert (train.weight_decay, strategy["align_weight_decay"]) == (official["weight_decay"], official["weight_decay"])
    assert (train.schedule, train.min_lr, official["scheduler"]) == ("cosine_epoch", official["min_lr"], "cosine")
    assert strategy["adapter_bottleneck"] == official["ffn_num"] and strategy.get("head_lr_factor", 0.1) == 0.1
    assert (strategy["merge_beta"], strategy["contrast_weight"]) == (official["adapter_momentum"], official["reg"])
    assert (strategy["align_epochs"], strategy["align_lr"]) == (official["crct_epochs"], official["ca_lr"])
    assert strategy["align_samples"] == 5 * official["batch_size"] and strategy.get("ensemble_first_guess", True) == official["ensemble"]
