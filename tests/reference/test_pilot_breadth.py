"""FeCAM, EASE and CoFiMA against LAMDA-PILOT's official code (``shared/refs/pilot``).

The conventions and the shared pieces are ``test_pilot.py``'s: the same tiny random ViT (timm's
``test_vit``) on both sides, the same seeded images preprocessed once by clpeft's backbone,
PILOT's learners assembled without their ``__init__`` (which downloads ViT-B/16), PILOT's
adapter ViT given clpeft's weights key by key. Compared over two tasks:

* FeCAM (``models/fecam.py``): the first session's adapter and cosine-head SGD steps, the class
  means, the shrunk and normalised covariances (through their pseudo-inverses) and the
  Mahalanobis distances;
* EASE (``models/ease.py``, ``backbone/vit_ease.py``, ``EaseCosineLinear``): each task's adapter and
  cosine-classifier SGD steps (same dropout draws), the prototypes of every subspace with the
  complemented ones, the ensemble's logits, and the passes through the blocks each side makes;
* CoFiMA (``models/cofima.py``): the slow learner's SGD steps over two tasks, both tasks' Fishers
  (``getFisherDiagonal``) and the Fisher-weighted average of the backbones (``interpolate_weights``);
* the published configs against ``exps/*.json``.
"""

from __future__ import annotations

import copy
import inspect
import json
import types
from functools import partial

import pytest
import torch
from torch import nn

import clpeft.config
from clpeft.strategies.cofima import CoFiMA
from clpeft.strategies.ease import EASE
from clpeft.strategies.fecam import FeCAM

from .test_pilot import (
    BATCH,
    BOTTLENECK,
    CONFIGS,
    LR,
    TASKS,
    WEIGHT_DECAY,
    WIDTH,
    _attached,
    _backbone,
    _close,
    _experience,
    _learner,
    _loader,
    _pilot_adapter_vit,
    _pilot_keys,
    _pilot_vit_net,
    _predict,
    _set_task,
    _task_data,
    _test_inputs,
    _train_steps,
    pilot_modules,
)


@pytest.fixture
def pilot(load_reference):
    """PILOT's ``models.{fecam,ease,cofima}``, ``utils.inc_net``, ``backbone.{vit_adapter,vit_ease}``."""
    with pilot_modules(
        load_reference, "models.fecam", ("models.ease", "models.cofima", "utils.inc_net", "backbone.vit_adapter", "backbone.vit_ease")
    ) as modules:
        yield modules


# ---------------------------------------------------------------------------------- FeCAM

PILOT_FECAM = {"shrinkage_diagonal": 0.0, "shrinkage_off_diagonal": 0.0, "ridge": 100.0, "normalisation": "corrcoef"}


def test_fecam_adapter_session_statistics_and_distances_equal_pilots(pilot):
    """FeCAM (adapter): PILOT's first session, class means, covariances and Mahalanobis distances.

    Task 0 trains the adapters (bottleneck 8) and the cosine head for one epoch as in
    ``test_pilot.py``'s RanPAC test; both sides then fit every class of both tasks. PILOT keeps
    ``corrcoef(cov + 100 I)`` per class and takes its float32 ``pinv`` at every distance; clpeft keeps
    the float64 pseudo-inverse. The matrix is singular (``torch.corrcoef`` centres its rows, so they
    span D - 1 dimensions): both pseudo-inverses drop that direction (its eigenvalue is rounding
    noise, below their cut-offs), so they are compared as computed; a float64 ``pinv`` of PILOT's
    float32 matrix would keep the noise (entries ~1e6). Tolerances: 1e-4 relative on the adapters, means and precisions (float32
    covariances on PILOT's side), 1e-4 absolute on the distances. Mutations checked: the paper's
    ``normalisation: correlation`` instead of PILOT's ``corrcoef``, ``ridge`` 100 -> 10, and
    biased (``ddof=0``) covariances each fail it.
    """
    backbone = _backbone()
    strategy = _attached(FeCAM(backbone, adapt="adapter", adapter_bottleneck=BOTTLENECK, **PILOT_FECAM))
    exp0 = _experience(0)
    strategy.before_experience(exp0)
    adapted = _pilot_adapter_vit(pilot, strategy.backbone)
    network = _pilot_vit_net(pilot, adapted)
    network.update_fc(len(TASKS[0]))
    with torch.no_grad():
        network.fc.weight.copy_(strategy.adapt_head.weight)
    learner = _learner(pilot.fecam, network, resume=False, dataset="toy", model_name="fecam", init_cls=2, increment=2)
    learner.cov_mats, learner.alpha = [], 100  # its __init__'s
    learner.save_checkpoint = lambda *a: None  # would write the adapted model to disk

    _train_steps(strategy, exp0)
    trained = _pilot_keys(strategy.backbone.net.state_dict())
    strategy.after_experience(exp0)
    torch.manual_seed(5)
    _set_task(learner, 0)
    x0, y0 = _task_data(0)
    learner._train(_loader(backbone, x0, y0), [], _loader(backbone, x0, y0))
    for key, value in adapted.state_dict().items():
        _close(trained[key], value)
    exp1 = _experience(1)
    strategy.before_experience(exp1)
    strategy.after_experience(exp1)
    network.update_fc(4)
    _set_task(learner, 1)
    learner._train([], [], _loader(backbone, *_task_data(1)))
    learner._total_classes = 4

    _close(strategy.head.means, network.fc.weight)
    for c, cov in enumerate(learner.cov_mats):
        _close(strategy.head.precision[c], torch.linalg.pinv(cov), rtol=1e-4, atol=1e-5)
    x = _test_inputs()
    with torch.no_grad():
        vectors = network.eval().backbone(backbone.preprocess(x)).numpy()
        distances = torch.from_numpy(learner._maha_dist(vectors, network.fc.weight.data, learner.cov_mats)).T
    _close(_predict(strategy, x), -distances, atol=1e-4)


@pytest.mark.parametrize("dataset, exps", [("cifar100", "fecam.json"), ("imagenet_r", "fecam_inr.json")])
def test_fecam_published_configs_are_pilots_setup(pilot, dataset, exps):
    """``configs/fecam/{cifar100,imagenet_r}_10t.yaml`` hold what ``python main.py --config ./exps/<json>`` runs.

    From the JSON: tasks (``init_cls`` = ``increment``), ``tuned_epoch``, SGD lr, batch size, weight
    decay, the cosine schedule to ``min_lr`` 0 and ``ffn_num``; from ``models/fecam.py``: the
    adapter backbone, the shrinkage ``cov + alpha I`` with ``alpha = 100`` and ``torch.corrcoef``;
    the backbone, images and class order as ``test_pilot.py``'s published-config test states for
    the adapter methods. Mutation checked: ``ridge: 10`` in either config fails it.
    """
    official = json.loads((pilot.root / "exps" / exps).read_text())
    source = inspect.getsource(pilot.fecam.Learner)
    assert "self.alpha = 100" in source and "torch.corrcoef(self.shrink_cov(cov,self.alpha))" in source
    cfg = clpeft.config.load(CONFIGS / "fecam" / f"{dataset}_10t.yaml")
    train, strategy, scenario, backbone = cfg.train, cfg.strategy.params, cfg.scenario.params, cfg.backbone.params
    assert official["init_cls"] == official["increment"] == {"cifar100": 100, "imagenet_r": 200}[dataset] // scenario["n_experiences"]
    assert scenario["class_order"] == official["seed"][0] == 1993
    assert official["backbone_type"] == "pretrained_vit_b16_224_adapter"
    assert backbone["model"] == "vit_base_patch16_224.augreg_in21k_ft_in1k" and backbone["pretrained"]
    assert (backbone["mean"], backbone["std"], backbone["crop_pct"]) == ([0, 0, 0], [1, 1, 1], 0.875)
    assert train.amp == "off" and train.augment == "crop_flip"
    assert train.epochs == official["tuned_epoch"]
    assert (train.optimizer, train.momentum, official["optimizer"]) == ("sgd", 0.9, "sgd")
    assert (train.lr, train.batch_size, train.weight_decay) == (official["init_lr"], official["batch_size"], official["weight_decay"])
    assert (train.schedule, train.min_lr) == ("cosine_epoch", official["min_lr"]) == ("cosine_epoch", 0)
    assert {k: strategy[k] for k in PILOT_FECAM} == PILOT_FECAM
    assert strategy["adapt"] == "adapter" and strategy["adapter_bottleneck"] == official["ffn_num"]


# ---------------------------------------------------------------------------------- EASE

PILOT_EASE = {
    "use_init_ptm": False,
    "use_diagonal": False,
    "use_old_data": False,
    "moni_adam": False,
    "use_reweight": True,
    "recalc_sim": True,
    "alpha": 0.1,
    "beta": 0,
}


def _pilot_ease_vit(pilot, backbone) -> nn.Module:
    """PILOT's ``vit_ease.VisionTransformer`` with ``backbone``'s (pre-trained) weights, frozen but its adapters."""
    config = types.SimpleNamespace(
        ffn_adapt=True,
        ffn_option="parallel",
        ffn_adapter_layernorm_option="none",
        ffn_adapter_init_option="lora",
        ffn_adapter_scalar="0.1",
        ffn_num=BOTTLENECK,
        d_model=WIDTH,
        vpt_on=False,
        vpt_num=0,
        _device="cpu",
    )
    net = pilot.vit_ease.VisionTransformer(
        img_size=32,
        patch_size=16,
        embed_dim=WIDTH,
        depth=6,
        num_heads=2,
        mlp_ratio=3,
        qkv_bias=True,
        norm_layer=partial(nn.LayerNorm, eps=1e-6),
        num_classes=0,
        global_pool=False,
        drop_path_rate=0.0,
        tuning_config=config,
    )
    missing, unexpected = net.load_state_dict(_pilot_keys(backbone.net.state_dict()), strict=False)
    assert not unexpected and all(k.startswith("cur_adapter.") for k in missing)
    for name, p in net.named_parameters():  # the factory's "freeze all but the adapter"
        p.requires_grad = name in missing
    net.out_dim = WIDTH
    return net.eval()


def _ease_learner(pilot, vit: nn.Module):
    """PILOT's EASE ``Learner`` and ``EaseNet`` around ``vit``, without their ``__init__``: ease.json's settings."""
    net = pilot.inc_net.EaseNet.__new__(pilot.inc_net.EaseNet)
    nn.Module.__init__(net)
    args = {
        "optimizer": "sgd",
        "scheduler": "cosine",
        "init_epochs": 1,
        "later_epochs": 1,
        "init_lr": LR,
        "later_lr": LR,
        "adapter_num": -1,
        **PILOT_EASE,
    }
    net.backbone, net.args, net.fc, net._device, net._cur_task, net.out_dim = vit, args, None, "cpu", -1, WIDTH
    net.inc = net.init_cls = len(TASKS[0])
    net.use_init_ptm, net.alpha, net.beta = False, args["alpha"], args["beta"]
    learner = pilot.ease.Learner.__new__(pilot.ease.Learner)
    learner._network, learner._device, learner._cur_task, learner._known_classes, learner.args = net, "cpu", -1, 0, args
    learner.batch_size, learner.weight_decay, learner.min_lr = BATCH, WEIGHT_DECAY, 0.0
    learner.init_cls = learner.inc = len(TASKS[0])
    learner.use_exemplars, learner.use_init_ptm, learner.use_diagonal = False, False, False
    learner.recalc_sim, learner.alpha, learner.beta, learner.moni_adam, learner.adapter_num = True, 0.1, 0, False, -1
    return learner


class _BlockPasses:
    """Counts calls of a ViT's last block (passes through the blocks) and the samples they carry."""

    def __init__(self, block: nn.Module):
        self.calls = self.samples = 0
        block.register_forward_hook(self._count)

    def _count(self, module, args, output):
        self.calls += 1
        self.samples += int(args[0].shape[0])

    def take(self) -> tuple[int, int]:
        counts, self.calls, self.samples = (self.calls, self.samples), 0, 0
        return counts


def test_ease_adapters_prototypes_complements_and_logits_equal_pilots_in_fewer_passes(pilot, monkeypatch):
    """EASE over two tasks: PILOT's adapter steps, subspace prototypes, complement and ensemble logits.

    Each task trains fresh adapters (bottleneck 8, scale 0.1, dropout 0.1 with the same draws) and
    a new cosine classifier over its own classes for one epoch with PILOT's SGD; clpeft's new
    adapters and classifier are copied into PILOT's (it draws its own at ``after_task``). Then both
    sides take the prototypes of every subspace (task 1: the complement of task 0's classes in
    subspace 1, PILOT's ``solve_sim_reset``), and the test inputs' logits (PILOT's
    ``forward_reweight``, alpha 0.1) are compared before PILOT's ``after_task``, as its trainer
    evaluates (``forward_reweight`` hard-codes ViT-B's width 768 as a default argument: the test
    sets it to the tiny ViT's). Passes through the blocks: PILOT loops over the adapter sets, clpeft runs them as
    one batch (the same samples). Tolerances: 1e-4 relative. Mutations checked: ``alpha`` 0.1 ->
    0.2, the complement's softmax over dim 0, and its similarity measured in the new subspace
    instead of the old class's own each fail it (``recompute_complements: false`` gives the same
    numbers with one old task; ``tests/strategies/test_pilot_breadth.py`` tells them apart).
    """
    reweight = pilot.inc_net.EaseCosineLinear.forward_reweight
    monkeypatch.setattr(reweight, "__defaults__", tuple(WIDTH if v == 768 else v for v in reweight.__defaults__))
    backbone = _backbone()
    strategy = _attached(EASE(backbone, adapter_bottleneck=BOTTLENECK))
    learner = _ease_learner(pilot, _pilot_ease_vit(pilot, backbone))
    network, vit = learner._network, learner._network.backbone
    theirs, ours = _BlockPasses(vit.blocks[-1]), _BlockPasses(strategy.adapted.net.blocks[-1])
    x = _test_inputs()
    for task in range(len(TASKS)):
        exp = _experience(task)
        strategy.before_experience(exp)
        if task:
            learner.after_task()  # freezes its adapters and draws new ones
        learner._cur_task, learner._total_classes = task, 2 * (task + 1)
        network.update_fc(learner._total_classes)
        with torch.no_grad():
            for adapter, bank in zip(vit.cur_adapter, strategy.banks, strict=True):
                adapter.load_state_dict(bank.current.state_dict())
            network.proxy_fc.weight.copy_(strategy.head.weight)
        xt, yt = _task_data(task)
        _train_steps(strategy, exp)
        torch.manual_seed(5)
        learner._train(_loader(backbone, xt, yt), None)
        for adapter, bank in zip(vit.cur_adapter, strategy.banks, strict=True):
            for key, value in adapter.state_dict().items():
                _close(bank.current.state_dict()[key], value)
        _close(strategy.head.weight, network.proxy_fc.weight)
        _close(strategy.head.scale, network.proxy_fc.sigma[0])
        assert theirs.take() == ours.take() == (-(-len(yt) // BATCH), len(yt))  # one pass per step on both sides

        strategy.after_experience(exp)
        learner.train_dataset_for_protonet = types.SimpleNamespace(labels=yt.numpy())
        learner.replace_fc(_loader(backbone, xt, yt))
        n, batches = task + 1, -(-len(yt) // BATCH)
        assert theirs.take() == (n * batches, n * len(yt)) and ours.take() == (batches, n * len(yt))
        _close(strategy.prototypes.reshape(len(strategy.prototypes), -1), network.fc.weight)
        with torch.no_grad():
            logits = network.eval()(backbone.preprocess(x), test=True)["logits"]
            assert theirs.take() == (n, n * len(x))
            _close(_predict(strategy, x), logits)
            assert ours.take() == (1, n * len(x))


@pytest.mark.parametrize(
    "dataset, exps, tasks", [("cifar100", "ease.json", 20), ("cifar100", "ease.json", 10), ("imagenet_r", "ease_inr.json", 10)]
)
def test_ease_published_configs_are_pilots_setup(pilot, dataset, exps, tasks):
    """``configs/ease/{cifar100_20t,cifar100_10t,imagenet_r_10t}.yaml`` hold what ``exps/ease*.json`` runs.

    From the JSON: the adapters (``ffn_num``), epochs and lr (``init_*`` = ``later_*``: one value
    each), batch size, weight decay, the cosine schedule to ``min_lr`` 0, SGD, ``alpha``,
    ``recalc_sim`` and the ablations off (``use_init_ptm``, ``use_diagonal``, ``use_old_data``,
    ``moni_adam``; ``use_reweight`` on); tasks from ``init_cls`` = ``increment`` (CIFAR-100: B0
    Inc5, 20 tasks; ``cifar100_10t`` is B0 Inc10, the other methods' split, with the same
    settings); the backbone and images as the adapter methods' configs (``vit_base_patch16_224``
    in ``vit_ease.py``). Mutation checked: ``alpha: 0.2`` in a config fails it.
    """
    official = json.loads((pilot.root / "exps" / exps).read_text())
    cfg = clpeft.config.load(CONFIGS / "ease" / f"{dataset}_{tasks}t.yaml")
    train, strategy, scenario, backbone = cfg.train, cfg.strategy.params, cfg.scenario.params, cfg.backbone.params
    classes = {"cifar100": 100, "imagenet_r": 200}[dataset]
    assert official["init_cls"] == official["increment"] and scenario["n_experiences"] == tasks
    assert tasks == classes // official["increment"] or (dataset, tasks) == ("cifar100", 10)
    assert scenario["class_order"] == official["seed"][0] == 1993
    assert official["backbone_type"] == "vit_base_patch16_224_ease"
    assert 'timm.create_model("vit_base_patch16_224", pretrained=True' in inspect.getsource(pilot.vit_ease)
    assert backbone["model"] == "vit_base_patch16_224.augreg_in21k_ft_in1k" and backbone["pretrained"]
    assert (backbone["mean"], backbone["std"], backbone["crop_pct"]) == ([0, 0, 0], [1, 1, 1], 0.875)
    assert train.amp == "off" and train.augment == "crop_flip"
    assert train.epochs == official["init_epochs"] == official["later_epochs"]
    assert train.lr == official["init_lr"] == official["later_lr"]
    assert (train.optimizer, train.momentum, official["optimizer"]) == ("sgd", 0.9, "sgd")
    assert (train.batch_size, train.weight_decay) == (official["batch_size"], official["weight_decay"])
    assert (train.schedule, train.min_lr, official["scheduler"]) == ("cosine_epoch", official["min_lr"], "cosine")
    assert {k: official[k] for k in PILOT_EASE} == PILOT_EASE
    assert strategy["adapter_bottleneck"] == official["ffn_num"] and strategy.get("alpha", 0.1) == official["alpha"]
    assert strategy.get("recompute_complements", True) == official["recalc_sim"]


# ---------------------------------------------------------------------------------- CoFiMA


def _cofima_learner(pilot, backbone):
    """PILOT's CoFiMA ``Learner`` and ``SLCANet`` around a copy of ``backbone``'s ViT, without their ``__init__``."""
    net = pilot.inc_net.SLCANet.__new__(pilot.inc_net.SLCANet)
    nn.Module.__init__(net)
    vit = copy.deepcopy(backbone.net).train()
    vit.out_dim = WIDTH
    net.backbone, net.fc, net.old_fc, net._device, net.model_type = vit, None, None, "cpu", "vit"
    learner = pilot.cofima.Learner.__new__(pilot.cofima.Learner)
    learner._network, learner._device, learner._multiple_gpus, learner.task_sizes = net, "cpu", [], []
    learner._cur_task, learner._known_classes, learner.batch_size, learner.epochs = -1, 0, BATCH, 1
    learner.lrate, learner.lrate_decay, learner.weight_decay, learner.milestones = LR, 0.1, WEIGHT_DECAY, [18]
    learner.bcb_lrscale, learner.fix_bcb, learner.fisher_weighting, learner.wt_lambda = 0.01, False, True, 0.4
    learner.prev_nets, learner.fisher_mat = [], []
    learner._compute_accuracy = lambda *a: 0.0
    return learner


def _backbone_part(state: dict) -> dict:
    """PILOT's ``backbone.*`` entries under clpeft's backbone names (``net.*``)."""
    return {"net." + k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}


def test_cofima_slow_learner_fishers_and_averaged_backbone_equal_pilots(pilot):
    """CoFiMA over two tasks: PILOT's stage-1 SGD steps, the Fishers and the Fisher-weighted average.

    Each task trains the whole ViT at ``lr x 0.01`` and the new head rows at ``lr`` for one epoch
    (SGD, momentum 0.9, weight decay; PILOT's ``_stage1_training``, its first milestone far away)
    from the same new rows. Then both sides take the Fisher of the trained model (clipped at
    1e-4) over the task's batches in the same order and, at task 1, average the backbone with
    task 0's (lambda 0.4). Only the backbone is compared after averaging: PILOT also averages the
    head, as the strategy's docstring explains. Tolerances: 1e-4 relative (the Fishers, squares of float32
    gradients where a few components cancel: 5e-3 relative, 1e-10 absolute, a millionth of the
    1e-4 clip; each tensor's sum: 1e-4 relative). Mutations checked: ``merge_weight`` 0.4 -> 0.6, the Fisher of the batch's summed
    instead of mean loss, and the kept Fisher taken after averaging each fail it.
    """
    backbone = _backbone()
    strategy = _attached(CoFiMA(backbone))
    learner = _cofima_learner(pilot, backbone)
    network = learner._network
    for task in range(len(TASKS)):
        exp = _experience(task)
        strategy.before_experience(exp)
        learner._cur_task, learner._total_classes = task, 2 * (task + 1)
        network.update_fc(len(TASKS[task]))
        with torch.no_grad():
            network.fc.heads[-1][0].weight.copy_(strategy.head.weight[2 * task :])
            network.fc.heads[-1][0].bias.copy_(strategy.head.bias[2 * task :])
        loader = _loader(backbone, *_task_data(task))
        _train_steps(strategy, exp)
        learner._stage1_training(loader, None)
        ours = dict(strategy.backbone.state_dict())
        for key, value in _backbone_part(network.state_dict()).items():
            _close(ours[key], value)
        _close(strategy.head.weight, torch.cat([head[0].weight for head in network.fc.heads]))

        network.fc.backup()
        learner.fisher_mat.append(learner.getFisherDiagonal(loader, learner.optimizer))
        if task:
            theta = pilot.cofima.interpolate_weights(
                learner.prev_nets[-1], network.state_dict(), alpha=0.4, fisher=True, fisher_mat=learner.fisher_mat[-2:]
            )
            network.load_state_dict(theta, strict=True)
        strategy.after_experience(exp)
        fisher = strategy.previous_fisher.tensors()  # kept for the next task's average
        for key, value in _backbone_part(learner.fisher_mat[-1]).items():
            _close(fisher[key], value, rtol=5e-3, atol=1e-10)
            _close(fisher[key].sum(), value.sum(), rtol=1e-4)
        for key, value in _backbone_part(network.state_dict()).items():
            _close(strategy.backbone.state_dict()[key], value)
        learner.prev_nets.append(copy.deepcopy(network.state_dict()))
        network.fc.recall()  # its after_task (which also logs the memory size)
        learner._known_classes = learner._total_classes


@pytest.mark.parametrize("dataset, exps", [("cifar100", "cofima.json"), ("imagenet_r", "cofima_inr.json")])
def test_cofima_published_configs_are_pilots_setup(pilot, dataset, exps):
    """``configs/cofima/{cifar100,imagenet_r}_10t.yaml`` hold what ``exps/cofima*.json`` runs.

    From the JSON: tasks, epochs, SGD lr (``lrate``), batch size, weight decay, the step decay
    (``milestones``, ``lrate_decay``), ``ca_epochs``, ``ca_with_logit_norm``, ``fisher_weighting``
    and ``wt_lambda``; from ``models/cofima.py``: ``bcb_lrscale`` 1/100, ``fishermax`` 1e-4, the
    alignment's lr (``lrate``), 256 samples per class and its mean shrinkage 0.1; the plain
    ``vit_base_patch16_224`` (no final-norm reset) and PILOT's images and class order.
    Mutation checked: ``merge_weight: 0.5`` in a config fails it.
    """
    official = json.loads((pilot.root / "exps" / exps).read_text())
    source = inspect.getsource(pilot.cofima)
    assert pilot.cofima.fishermax == 1e-4 and "self.bcb_lrscale = 1.0/100" in source
    assert "num_sampled_pcls = 256" in source and "decay = (t_id+1)/(self._cur_task+1)*0.1" in source
    assert "'lr': self.lrate" in source[source.index("def _stage2_compact_classifier") :]
    cfg = clpeft.config.load(CONFIGS / "cofima" / f"{dataset}_10t.yaml")
    train, strategy, scenario, backbone = cfg.train, cfg.strategy.params, cfg.scenario.params, cfg.backbone.params
    assert official["init_cls"] == official["increment"] == {"cifar100": 100, "imagenet_r": 200}[dataset] // scenario["n_experiences"]
    assert scenario["class_order"] == official["seed"][0] == 1993
    assert official["backbone_type"] == "vit_base_patch16_224"
    assert backbone["model"] == "vit_base_patch16_224.augreg_in21k_ft_in1k" and backbone["pretrained"]
    assert not backbone.get("freeze", False)
    assert (backbone["mean"], backbone["std"], backbone["crop_pct"]) == ([0, 0, 0], [1, 1, 1], 0.875)
    assert train.amp == "off" and train.augment == "crop_flip"
    assert (train.epochs, train.lr, train.batch_size, train.weight_decay) == (
        official["epochs"],
        official["lrate"],
        official["batch_size"],
        official["weight_decay"],
    )
    assert (train.optimizer, train.momentum) == ("sgd", 0.9)
    assert (train.schedule, train.milestones, train.gamma) == ("multistep", official["milestones"], official["lrate_decay"])
    params = {
        "backbone_lr_scale": 0.01,
        "merge_weight": official["wt_lambda"],
        "fisher_weighting": official["fisher_weighting"],
        "fisher_max": 1e-4,
        "align_epochs": official["ca_epochs"],
        "align_lr": official["lrate"],
        "align_temperature": official["ca_with_logit_norm"],
        "align_samples": 256,
        "mean_shrink": 0.1,
    }
    defaults = {k: v.default for k, v in inspect.signature(CoFiMA).parameters.items() if k in params}
    assert {k: strategy.get(k, defaults[k]) for k in params} == params
