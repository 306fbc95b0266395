"""SimpleCIL, APER (adapter) and RanPAC against LAMDA-PILOT's official code (``shared/refs/pilot``).

Both sides run the same tiny random ViT (timm's ``test_vit``: width 64, 2 heads, 6 blocks, at
32 px) on the same seeded images, preprocessed once by clpeft's backbone. PILOT's ViT with
AdaptFormer adapters (``backbone/vit_adapter.py``, its q/k/v split and ``fc1``/``fc2`` layout)
gets clpeft's weights key by key. Compared over two tasks:

* SimpleCIL (``models/simplecil.py`` ``replace_fc``): prototypes and logits;
* APER with adapters (``models/aper_adapter.py`` ``_train``): the adapters, cosine head and its
  ``sigma`` after the first session's SGD steps with the same dropout draws, the prototypes of the
  concatenated [pre-trained, adapted] features and the logits;
* RanPAC with adapters (``models/ranpac.py`` ``_train``): the adapter steps, ``G`` and ``Q``
  given the same projection ``W``, the ridge candidates' held-out losses and the chosen lambda
  given the same 80/20 split, the ridge weights and the logits (PILOT's cosine read-out);
* the published configs against ``exps/*.json`` and ``utils/data.py``.

Shims, all from the test side: ``timm.models.layers.weight_init`` (gone from today's timm) is a
stub holding timm's ``trunc_normal_``; the learners and networks are assembled without their
``__init__`` (which download ViT-B/16), and the learners' per-epoch test accuracy is a stub. The
adapter ViT's factory (``vit_base_patch16_224_adapter``) freezes every loaded weight and leaves
the adapters trainable; the test does the same to the ViT it builds directly.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import json
import types
import warnings
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from torch import nn

import clpeft.config
import clpeft.strategies.ranpac as clpeft_ranpac
from clpeft.backbones.timm_backbone import TimmBackbone
from clpeft.config import TrainConfig
from clpeft.data import ArrayDataset, Batch, DataView
from clpeft.data_access import DataAccess
from clpeft.experience import Experience
from clpeft.strategies.aper import APER
from clpeft.strategies.ranpac import RanPAC
from clpeft.strategies.simplecil import SimpleCIL
from clpeft.training import make_optimizer, optimizer_step

WIDTH, BOTTLENECK, PER_CLASS, BATCH = 64, 8, 12, 8
TASKS = [[0, 1], [2, 3]]
LR, WEIGHT_DECAY = 0.01, 5e-4
CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@contextlib.contextmanager
def pilot_modules(load_reference, anchor: str, others: tuple[str, ...]):
    """PILOT's ``anchor`` module and ``others`` as one namespace (by their last name, plus ``root``),
    with the shims its old timm imports need."""
    weight_init = types.ModuleType("timm.models.layers.weight_init")
    weight_init.trunc_normal_ = timm.layers.trunc_normal_
    with warnings.catch_warnings():  # its timm.models.layers / registry imports are deprecated
        warnings.simplefilter("ignore", FutureWarning)
        with load_reference("pilot", anchor, stubs={"timm.models.layers.weight_init": weight_init}) as first:
            yield types.SimpleNamespace(
                **{anchor.rpartition(".")[2]: first},
                **{name.rpartition(".")[2]: importlib.import_module(name) for name in others},
                root=Path(first.__file__).parents[1],
            )


@pytest.fixture
def pilot(load_reference):
    """PILOT's ``models.{simplecil,aper_adapter,ranpac}``, ``utils.inc_net``, ``backbone.{vit_adapter,vpt}``."""
    with pilot_modules(
        load_reference,
        "models.ranpac",
        ("models.simplecil", "models.aper_adapter", "utils.inc_net", "backbone.vit_adapter", "backbone.vpt"),
    ) as modules:
        yield modules


# ---------------------------------------------------------------------------------- both sides' pieces


def _backbone() -> TimmBackbone:
    torch.manual_seed(0)
    return TimmBackbone((3, 32, 32), model="test_vit", img_size=32, freeze=True)


def _task_data(task: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded ``uint8`` images of the task's classes (each class has its own mean colour)."""
    g = torch.Generator().manual_seed(10 + task)
    y = torch.tensor(TASKS[task]).repeat_interleave(PER_CLASS)
    base = torch.randint(0, 256, (len(TASKS[task]), 3, 1, 1), generator=g).float()
    x = base[y - TASKS[task][0]] + 60 * torch.randn(len(y), 3, 32, 32, generator=g)
    return x.clamp(0, 255).to(torch.uint8), y


def _experience(task: int) -> Experience:
    x, y = _task_data(task)
    seen = [c for t in TASKS[: task + 1] for c in t]
    return Experience(task, DataView.of(ArrayDataset(x, y, f"toy{task}")), None, TASKS[task], seen)


def _attached(strategy):
    strategy.attach(DataAccess(torch.device("cpu"), None, strategy.backbone, BATCH))
    return strategy.eval()


def _loader(backbone: TimmBackbone, x: torch.Tensor, y: torch.Tensor, order=None) -> list:
    """PILOT's loader batches ``(index, input, label)`` of clpeft-preprocessed images, in ``order``."""
    order = torch.arange(len(y)) if order is None else order
    return [(None, backbone.preprocess(x[i]), y[i]) for i in order.split(BATCH)]


def _train_steps(strategy, exp: Experience) -> None:
    """One epoch of clpeft's engine step (SGD as in PILOT's exps) over ``exp`` in stored order."""
    train = TrainConfig(lr=LR, optimizer="sgd", momentum=0.9, weight_decay=WEIGHT_DECAY)
    optimizer = make_optimizer(strategy.param_groups(LR), train)
    x, y = _task_data(exp.index)
    strategy.train()
    torch.manual_seed(5)  # the adapters' dropout draws; PILOT's epoch starts from the same seed
    for i in torch.arange(len(y)).split(BATCH):
        optimizer_step(optimizer, strategy.training_step(Batch(x[i], y[i])), None)
    strategy.eval()


def _pilot_keys(state: dict) -> dict:
    """A timm ViT state (clpeft's, adapters wrapped around blocks) in PILOT's adapter-ViT names."""
    out = {}
    for key, value in state.items():
        key = key.replace(".block.", ".").replace(".adapter.", ".adaptmlp.").replace("mlp.fc", "fc")
        if ".attn.qkv." in key:
            for name, part in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3)):
                out[key.replace("qkv", name)] = part
        else:
            out[key] = value
    return out


def _pilot_adapter_vit(pilot, backbone: TimmBackbone) -> nn.Module:
    """PILOT's ``vit_adapter.VisionTransformer`` with ``backbone``'s weights (its adapters included)."""
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
    )
    net = pilot.vit_adapter.VisionTransformer(
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
    net.load_state_dict(_pilot_keys(backbone.net.state_dict()), strict=True)
    for name, p in net.named_parameters():  # the factory's "freeze all but the adapter"
        p.requires_grad = "adaptmlp" in name
    net.out_dim = WIDTH
    return net.eval()


def _pilot_vit_net(pilot, backbone_net: nn.Module) -> nn.Module:
    """PILOT's ``SimpleVitNet`` around ``backbone_net`` (its ``__init__`` would download ViT-B/16)."""
    net = pilot.inc_net.SimpleVitNet.__new__(pilot.inc_net.SimpleVitNet)
    nn.Module.__init__(net)
    net.backbone, net.fc, net._device, net.model_type, net.W_rand, net.RP_dim = backbone_net, None, "cpu", "vit", None, None
    backbone_net.out_dim = WIDTH
    return net


def _learner(module, network: nn.Module, **args):
    """A PILOT ``Learner`` of ``module`` without its ``__init__``: the exps' settings as attributes."""
    learner = module.Learner.__new__(module.Learner)
    learner._network, learner._device, learner._cur_task, learner._known_classes = network, "cpu", 0, 0
    learner.batch_size, learner.init_lr, learner.weight_decay, learner.min_lr = BATCH, LR, WEIGHT_DECAY, 0.0
    learner.args = {"optimizer": "sgd", "tuned_epoch": 1, **args}
    learner._compute_accuracy = lambda *a: 0.0  # per-epoch test accuracy (a log line)
    return learner


def _set_task(learner, task: int) -> None:
    learner._cur_task = task
    learner.train_dataset = types.SimpleNamespace(labels=_task_data(task)[1].numpy())


def _test_inputs() -> torch.Tensor:
    return torch.cat([_task_data(t)[0][::3] for t in range(len(TASKS))])


@torch.no_grad()
def _predict(strategy, x: torch.Tensor) -> torch.Tensor:
    """``predict`` as the engine calls it: on cached features when the strategy reads them."""
    return strategy.predict(strategy.backbone(x) if strategy.uses_features else x)


def _close(ours: torch.Tensor, theirs: torch.Tensor, atol: float = 2e-5, rtol: float = 1e-4) -> None:
    torch.testing.assert_close(ours.detach().double(), theirs.detach().double(), atol=atol, rtol=rtol)


# ---------------------------------------------------------------------------------- SimpleCIL


@torch.no_grad()
def test_simplecil_prototypes_and_logits_equal_pilots(pilot):
    """SimpleCIL's prototypes and logits are PILOT's ``replace_fc`` class means and ``CosineLinear``.

    Two tasks; PILOT's network is its ``SimpleVitNet`` around the same timm ViT. Tolerance: 1e-5
    (float32 features, float64 means on clpeft's side). Mutation checked: ``metric="euclidean"``
    as SimpleCIL's default fails it.
    """
    backbone = _backbone()
    strategy = _attached(SimpleCIL(backbone))
    network = _pilot_vit_net(pilot, copy.deepcopy(backbone.net).eval())
    learner = _learner(pilot.simplecil, network)
    for task in range(len(TASKS)):
        exp = _experience(task)
        strategy.before_experience(exp)
        strategy.after_experience(exp)
        network.update_fc(len(exp.classes_seen_so_far))
        _set_task(learner, task)
        learner.replace_fc(_loader(backbone, *_task_data(task)), network, None)
    _close(strategy.head.prototypes, network.fc.weight)
    x = _test_inputs()
    _close(_predict(strategy, x), network(backbone.preprocess(x))["logits"])


# ---------------------------------------------------------------------------------- APER


def test_aper_adapter_session_prototypes_and_logits_equal_pilots(pilot, monkeypatch):
    """APER (adapter): PILOT's first-session SGD, its dual-branch prototypes and cosine logits.

    Task 0 trains the adapters (bottleneck 8, scale 0.1, dropout 0.1 with the same draws) and
    the cosine head (weights and ``sigma``) for one epoch with PILOT's optimizer (SGD, momentum
    0.9, weight decay, its cosine schedule, whose first epoch runs at ``init_lr``); then both sides
    set prototypes of ``[phi(x), phi*(x)]`` per task. PILOT's ``construct_dual_branch_network``
    (which downloads its pre-trained branch) is replaced by the same network built around the
    same ViTs. Tolerance: 1e-4 relative. Mutations checked: APER's default ``adapter_scale``
    0.1 -> 0.2, and a 1% change of the scale inside ``Adapter.forward``, each fail it.
    """
    backbone = _backbone()
    strategy = _attached(APER(backbone, peft="adapter", adapter_bottleneck=BOTTLENECK))
    exp0 = _experience(0)
    strategy.before_experience(exp0)
    adapted = _pilot_adapter_vit(pilot, strategy.adapted)
    network = _pilot_vit_net(pilot, adapted)
    network.update_fc(len(TASKS[0]))
    with torch.no_grad():
        network.fc.weight.copy_(strategy.adapt_head.weight)
    learner = _learner(pilot.aper_adapter, network, init_cls=len(TASKS[0]))

    def dual_branch():  # PILOT's MultiBranchCosineIncrementalNet, pre-trained branch = the same ViT
        net = pilot.inc_net.MultiBranchCosineIncrementalNet.__new__(pilot.inc_net.MultiBranchCosineIncrementalNet)
        nn.Module.__init__(net)
        pretrained = copy.deepcopy(backbone.net).eval()
        pretrained.out_dim = WIDTH
        net.backbone, net.backbones = nn.Identity(), nn.ModuleList([pretrained])
        net.model_type, net._device, net.args = "vit", "cpu", learner.args
        net.backbones.append(learner._network.backbone)
        net._feature_dim = 2 * WIDTH
        net.fc = net.generate_fc(net._feature_dim, learner.args["init_cls"])
        learner._network = net

    monkeypatch.setattr(learner, "construct_dual_branch_network", dual_branch)
    _train_steps(strategy, exp0)
    trained = {
        "adaptmlp": _pilot_keys(strategy.adapted.net.state_dict()),
        "fc": strategy.adapt_head.weight.detach().clone(),
        "sigma": strategy.adapt_head.scale.detach().clone(),
    }
    torch.manual_seed(5)
    _set_task(learner, 0)
    x0, y0 = _task_data(0)
    learner._train(_loader(backbone, x0, y0), [], _loader(backbone, x0, y0))
    for key, value in adapted.state_dict().items():
        _close(trained["adaptmlp"][key], value)
    _close(trained["fc"], network.fc.weight)
    _close(trained["sigma"], network.fc.sigma[0])
    strategy.after_experience(exp0)
    exp1 = _experience(1)
    strategy.before_experience(exp1)
    strategy.after_experience(exp1)
    learner._network.update_fc(4)
    _set_task(learner, 1)
    learner._train([], [], _loader(backbone, *_task_data(1)))
    _close(strategy.head.prototypes, learner._network.fc.weight)
    x = _test_inputs()
    with torch.no_grad():
        _close(_predict(strategy, x), learner._network.eval()(backbone.preprocess(x))["logits"])


# ---------------------------------------------------------------------------------- RanPAC


def test_ranpac_adapter_statistics_ridge_and_logits_equal_pilots(pilot, monkeypatch):
    """RanPAC (adapter, M = 16): PILOT's phase 1, ``G``, ``Q``, lambda, ridge weights and logits.

    Phase 1 as in the APER test (PILOT's ``SimpleVitNet`` with its cosine ``fc``). PILOT's
    ``setup_RP`` draws its own ``W_rand``; the test then puts clpeft's projection in its place.
    clpeft's random 80/20 split is recorded (``torch.randperm``) and PILOT's loader is given the
    samples in that order, since PILOT fits lambda on the first 80% of its shuffled loader. The
    candidates' held-out MSEs are compared (PILOT's ``F.mse_loss`` values, recorded through its
    module's ``F``) for lambda >= 1e-4 (below, float32 solves of a near-singular ``G`` differ),
    and so is the choice. clpeft's ``head: cosine`` is PILOT's ``CosineLinear`` read-out up to
    its learned ``sigma``. Tolerances: 1e-4 relative (``G``, ``Q``: float32 sums against
    float64). Mutations checked: ridge candidates ``np.arange(-8, 14)`` (the losses list grows), a
    Bernoulli holdout instead of the exact 80/20 split, and the linear read-out for
    ``head: cosine`` each fail it.
    """
    M = 16
    backbone = _backbone()
    strategy = _attached(RanPAC(backbone, projection_dim=M, head="cosine", adapt="adapter", adapter_bottleneck=BOTTLENECK))
    exp0 = _experience(0)
    strategy.before_experience(exp0)
    adapted = _pilot_adapter_vit(pilot, strategy.backbone)
    network = _pilot_vit_net(pilot, adapted)
    network.update_fc(len(TASKS[0]))
    with torch.no_grad():
        network.fc.weight.copy_(strategy.adapt_head.weight)
    learner = _learner(pilot.ranpac, network, M=M, nb_classes=4, use_RP=True)
    setup_rp = learner.setup_RP

    def setup_with_our_projection():
        setup_rp()
        learner.W_rand = network.W_rand = strategy.projection.clone()

    monkeypatch.setattr(learner, "setup_RP", setup_with_our_projection)
    pilot_losses, our_losses, orders = [], [], []
    functional = types.ModuleType("F")  # PILOT's torch.nn.functional, recording mse_loss
    functional.__dict__.update(vars(pilot.ranpac.F))
    functional.mse_loss = lambda *a: pilot_losses.append(float(torch.nn.functional.mse_loss(*a))) or pilot_losses[-1]
    monkeypatch.setattr(pilot.ranpac, "F", functional)
    choose = clpeft_ranpac.ridge_by_holdout
    monkeypatch.setattr(clpeft_ranpac, "ridge_by_holdout", lambda *a: our_losses.append(choose(*a)[1]) or choose(*a))
    randperm = torch.randperm
    monkeypatch.setattr(torch, "randperm", lambda *a, **k: orders.append(randperm(*a, **k)) or orders[-1])

    _train_steps(strategy, exp0)
    trained = _pilot_keys(strategy.backbone.net.state_dict())
    strategy.after_experience(exp0)
    torch.manual_seed(5)
    _set_task(learner, 0)
    x0, y0 = _task_data(0)
    learner._train(_loader(backbone, x0, y0), [], _loader(backbone, x0, y0, orders[0]))
    for key, value in adapted.state_dict().items():
        _close(trained[key], value)
    exp1 = _experience(1)
    strategy.before_experience(exp1)
    strategy.after_experience(exp1)
    network.update_fc(4)
    _set_task(learner, 1)
    learner._train([], [], _loader(backbone, *_task_data(1), orders[1]))

    _close(strategy.stats.gram(), learner.G, rtol=1e-4, atol=1e-3)
    _close(strategy.stats.class_sums().T, learner.Q, rtol=1e-4, atol=1e-3)
    candidates = 10.0 ** np.arange(-8, 9)
    assert strategy.ridge_candidates == candidates.tolist()
    for task, (ours, theirs) in enumerate(zip(our_losses, np.array(pilot_losses).reshape(len(TASKS), -1))):
        assert len(ours) == len(theirs) == len(candidates)
        seen = 2 * (task + 1)  # the mean runs over the classes seen (clpeft) or all nb_classes = 4 (PILOT)
        np.testing.assert_allclose(np.array(ours)[candidates >= 1e-4] * seen / 4, theirs[candidates >= 1e-4], rtol=1e-3)
    assert float(strategy.ridge) == candidates[int(np.argmin(pilot_losses[-len(candidates) :]))]
    _close(strategy.head.weight, network.fc.weight, rtol=1e-3, atol=1e-5)
    x = _test_inputs()
    with torch.no_grad():
        _close(_predict(strategy, x), network.eval()(backbone.preprocess(x))["logits"] / network.fc.sigma, atol=1e-4)


@pytest.mark.parametrize("vpt_type", ["deep", "shallow"])
@torch.no_grad()
def test_aper_vpt_features_equal_pilots_prompted_vit(pilot, vpt_type):
    """APER's ``phi*(x)`` with VPT prompts is PILOT's ``VPT_ViT`` (``backbone/vpt.py``) with them.

    PILOT appends the prompts after the patch tokens (and, deep, swaps them before every
    block); clpeft inserts them after the class token: self-attention without position
    embeddings on the prompts makes the class token's output the same. Both start from zero
    prompts; the test then sets random ones. Tolerance: 1e-5. Mutation checked: APER's former
    uniform initialisation of the prompts fails it.
    """
    backbone = _backbone()
    strategy = APER(backbone, peft="vpt", vpt_type=vpt_type, prompt_length=3)
    net = pilot.vpt.VPT_ViT(
        img_size=32, patch_size=16, embed_dim=WIDTH, depth=6, num_heads=2, mlp_ratio=3, Prompt_Token_num=3, VPT_type=vpt_type.capitalize()
    )
    assert not net.Prompt_Tokens.any() and not strategy.prompt_tokens.any()
    net.load_state_dict(backbone.net.state_dict(), strict=False)
    torch.manual_seed(3)
    strategy.prompt_tokens.copy_(torch.randn_like(strategy.prompt_tokens))
    net.Prompt_Tokens.copy_(strategy.prompt_tokens)
    x = _test_inputs()
    _close(strategy.adapted_features(x), net.eval()(backbone.preprocess(x)))


@pytest.mark.parametrize(
    "method, dataset, exps",
    [
        ("simplecil", "cifar100", "simplecil.json"),
        ("simplecil", "imagenet_r", "simplecil_inr.json"),
        ("aper", "cifar100", "aper_aperpter.json"),
        ("aper", "imagenet_r", "aper_aperpter_inr.json"),
        ("ranpac", "cifar100", "ranpac.json"),
        ("ranpac", "imagenet_r", "ranpac_inr.json"),
    ],
)
def test_published_configs_are_pilots_setup(pilot, method, dataset, exps):
    """``configs/<method>/{cifar100,imagenet_r}_10t.yaml`` hold what ``python main.py --config ./exps/<json>`` runs.

    From the JSON: tasks (``init_cls`` = ``increment``), epochs, SGD lr, batch size, weight decay,
    the cosine schedule to ``min_lr`` 0, ``ffn_num``, ``M``; the backbone its ``backbone_type``
    loads with PILOT's timm 0.6.12 (its README's pin): ``vit_base_patch16_224`` = augreg's IN-21k
    pre-trained, IN-1k fine-tuned ViT-B/16, ``vit_base_patch16_224.augreg_in21k_ft_in1k`` in
    today's timm; from ``utils/data.py`` ``build_transform``: no ``Normalize`` ([0, 1] inputs:
    mean 0, std 1), test ``Resize(256, bicubic) + CenterCrop(224)`` (crop_pct 0.875), training
    ``RandomResizedCrop(224, scale 0.05-1) + flip`` (``crop_flip``), float32 (no autocast). The
    class order is PILOT's seed 1993. RanPAC's no-adapter ablation lives in ``*_no_adapter.yaml``.
    Mutation checked: the IN-21k weights (the configs' old backbone) fail it.
    """
    official = json.loads((pilot.root / "exps" / exps).read_text())
    cfg = clpeft.config.load(CONFIGS / method / f"{dataset}_10t.yaml")
    train, strategy, scenario, backbone = cfg.train, cfg.strategy.params, cfg.scenario.params, cfg.backbone.params
    assert official["init_cls"] == official["increment"] == {"cifar100": 100, "imagenet_r": 200}[dataset] // scenario["n_experiences"]
    assert scenario["class_order"] == official["seed"][0] == 1993
    assert official["backbone_type"].startswith("pretrained_vit_b16_224") and "in21k" not in official["backbone_type"]
    assert backbone["model"] == "vit_base_patch16_224.augreg_in21k_ft_in1k" and backbone["pretrained"]
    assert timm.models.get_pretrained_cfg(backbone["model"]).url.endswith(
        "B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0--imagenet2012-steps_20k-lr_0.01-res_224.npz"
    )
    assert (backbone["mean"], backbone["std"], backbone["crop_pct"]) == ([0, 0, 0], [1, 1, 1], 0.875)
    assert train.amp == "off"
    if method == "simplecil":
        assert official["tuned_epoch"] == 0 and strategy.get("metric", "cosine") == "cosine"
        return
    assert train.epochs == official["tuned_epoch"] and train.augment == "crop_flip"
    assert (train.optimizer, train.momentum, official["optimizer"]) == ("sgd", 0.9, "sgd")
    assert (train.lr, train.batch_size, train.weight_decay) == (official["init_lr"], official["batch_size"], official["weight_decay"])
    assert (train.schedule, train.min_lr) == ("cosine_epoch", official["min_lr"]) == ("cosine_epoch", 0)  # stepped per epoch
    assert strategy["adapter_bottleneck"] == official["ffn_num"]
    if method == "aper":
        assert strategy["peft"] == "adapter" and official["backbone_type"].endswith("_adapter")
    else:
        assert official["use_RP"] and strategy["projection_dim"] == official["M"]
        assert strategy["adapt"] == "adapter" and official["backbone_type"].endswith("_adapter")
        assert strategy["head"] == "cosine"  # PILOT's CosineLinear read-out of the ridge weights
        ablation = clpeft.config.load(CONFIGS / method / f"{dataset}_10t_no_adapter.yaml")
        assert ablation.strategy.params["adapt"] == "none" and ablation.train.epochs == 1
