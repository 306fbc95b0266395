"""InfLoRA against the official code, liangyanshuo/InfLoRA (``shared/refs/inflora``).

The whole official task loop runs beside clpeft's ``lora_cl`` with ``subspace: inflora``: the
official learner's ``InfLoRA._train`` (``methods/inflora.py``: input covariance pass, designed
``A`` of every ``Attention_LoRA``, Adam on ``lora_B_k``/``lora_B_v`` and the task's classifier under
``CosineSchedule``, covariance pass again, ``update_DualGPM``) on the official ViT
(``models/vit_inflora.py`` inside ``models/sinet_inflora.py``'s ``SiNet``), and clpeft's strategy
hooks driven as the engine drives them (``make_optimizer``, ``make_scheduler`` with
``train.schedule: quarter_cosine``, ``optimizer_step``), on the same tiny random ViT (timm's
``test_vit``: width 64, 2 heads, 6 blocks, at 32 px; clpeft's ``backbone.split_qkv`` gives it
separate ``qkv.k`` / ``qkv.v`` linears, the official model gets the fused weights), the same head
rows and the same seeded batches in the same order, over three tasks. Compared after every task:
the designed ``A`` of k and v (up to the sign of each singular vector), the trained updates
``B_t A_t`` (sign-free), the classifier, the protected subspaces (as projections, whatever
DualGPM's representation), the logits over all classes, and which parameters train.

``update_DualGPM`` is also run on its own, on the same feature matrices as
``InputSubspace.extend``: its selections (first task, later tasks, DualGPM's ``retain`` mode past
half the dimension) equal the default ``criterion="inflora"``; GPM's criterion (``gpm``) keeps
more directions at the same threshold, shown as the difference it is. The official code's failure
when the first task's subspace spans more than half the dimension is shown too.

Shims, all from the test side:

* ``utils.schedulers`` is not in the reference folder (the official repository has it);
  CODA-Prompt's ``utils/schedulers.py`` from ``shared/refs/coda-prompt``, byte for byte the same
  file at InfLoRA's pinned commit, stands in;
* ``utils.toolkit.tensor2numpy`` (also absent) is the official one-liner ``x.data.numpy()``;
* ``models.zoo`` (CODA-Prompt's prompt, unused by InfLoRA), ``ipdb`` and ``sklearn.cluster``
  (``KMeans``, used only by ``clustering``, which the tested path never calls; importing it takes
  seconds) are empty stubs;
* ``timm.models.registry.register_model`` leaves timm's registry alone (the official ViT file
  would otherwise overwrite timm's own ``vit_*`` entries for the rest of the session);
* the learner's ``np`` is numpy with numpy 1's ``np.linalg.svd`` of a torch tensor (ndarrays
  back; numpy 2 hands them to the tensor's ``__array_wrap__``, and the official code then fails at
  ``.transpose()``);
* ``SiNet`` downloads ViT-B/16 in ``__init__`` and the learner builds it, so both are assembled
  around the tiny official ViT without their ``__init__`` (the attributes the official
  ``__init__`` sets).
"""

from __future__ import annotations

import importlib
import types
import warnings
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from torch import nn

import clpeft.config
from clpeft.backbones.timm_backbone import TimmBackbone
from clpeft.components.lora import LoRALinear
from clpeft.components.lora.input_subspace import InputSubspace
from clpeft.config import TrainConfig
from clpeft.data import ArrayDataset, Batch, DataView
from clpeft.data_access import DataAccess
from clpeft.experience import Experience
from clpeft.strategies.lora_cl import LoRACL
from clpeft.training import make_optimizer, make_scheduler, optimizer_step

# numpy 2 on the reference's np.dot of torch tensors (the official environment had numpy 1)
pytestmark = pytest.mark.filterwarnings("ignore:__array:DeprecationWarning")

WIDTH, DEPTH, RANK, TASKS, CLASSES = 64, 6, 3, 3, 2  # test_vit; InfLoRA's rank; tasks; classes per task
PER_CLASS, BATCH, EPOCHS, LR = 6, 4, 3, 1e-3
TARGETS = ["qkv.k", "qkv.v"]
CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "lora_cl"


def _numpy_1(stub_module) -> types.ModuleType:
    """numpy as the official environment had it: ``np.linalg.svd`` of a torch tensor returns arrays
    (numpy 2 hands the results to the tensor's ``__array_wrap__``, which makes them tensors)."""

    def svd(a, *args, **kwargs):
        return np.linalg.svd(np.asarray(a), *args, **kwargs)

    return stub_module("numpy", **{**vars(np), "linalg": types.SimpleNamespace(svd=svd)})


@pytest.fixture(scope="module")
def ref(load_reference, stub_module):
    """The official ``methods.inflora``, ``models.sinet_inflora`` and ``models.vit_inflora`` (shims
    above), imported once for the module (the import takes seconds) and removed afterwards."""
    with warnings.catch_warnings():  # the references import timm's deprecated module paths
        warnings.simplefilter("ignore", FutureWarning)
        with load_reference("coda-prompt", "utils.schedulers") as schedulers:
            pass
        stubs = {
            "utils": stub_module("utils"),
            "utils.schedulers": schedulers,
            "utils.toolkit": stub_module("utils.toolkit", tensor2numpy=lambda x: x.data.numpy(), accuracy=None),
            "models.zoo": stub_module("models.zoo", CodaPrompt=None),
            "ipdb": stub_module("ipdb"),
            "sklearn.cluster": stub_module("sklearn.cluster", KMeans=None),
            "timm.models.registry": stub_module("timm.models.registry", register_model=lambda fn: fn),
        }
        with load_reference("inflora", "methods.inflora", stubs=stubs) as inflora:
            inflora.np = _numpy_1(stub_module)  # the module object is dropped with the reference
            yield types.SimpleNamespace(
                inflora=inflora, sinet=importlib.import_module("models.sinet_inflora"), vit=importlib.import_module("models.vit_inflora")
            )


# ------------------------------------------------------------------------------------ both sides


def _backbone() -> TimmBackbone:
    torch.manual_seed(0)
    return TimmBackbone((3, 32, 32), model="test_vit", img_size=32, freeze=True, split_qkv=True)


def _fused_state(backbone: TimmBackbone) -> dict[str, torch.Tensor]:
    """``backbone``'s weights under the official names: the split q, k, v linears fused into ``qkv``."""
    state, fused = dict(backbone.net.state_dict()), {}
    for key in [k for k in state if ".attn.qkv.q." in k]:
        stem, kind = key.split(".attn.qkv.q.")
        fused[f"{stem}.attn.qkv.{kind}"] = torch.cat([state.pop(f"{stem}.attn.qkv.{p}.{kind}") for p in "qkv"])
    return {**state, **fused}


def _official_network(ref, backbone: TimmBackbone):
    """``SiNet`` around the official ViT holding ``backbone``'s weights (``SiNet.__init__`` and
    ``InfLoRA.__init__``'s ``init_param`` without the download)."""
    net = ref.sinet.SiNet.__new__(ref.sinet.SiNet)
    nn.Module.__init__(net)
    net.image_encoder = ref.sinet.ViT_lora_co(
        img_size=32, patch_size=16, embed_dim=WIDTH, depth=DEPTH, num_heads=2, mlp_ratio=3, n_tasks=TASKS, rank=RANK
    )
    missing, unexpected = net.image_encoder.load_state_dict(_fused_state(backbone), strict=False)
    assert not unexpected and all("lora_" in k or "_grow" in k or k.startswith("head.") for k in missing)
    net.class_num = CLASSES
    net.classifier_pool = nn.ModuleList(nn.Linear(WIDTH, CLASSES) for _ in range(TASKS))
    net.numtask = 0
    for module in net.modules():
        if isinstance(module, ref.vit.Attention_LoRA):
            module.init_param()
    return net.eval()


def _official_learner(ref, network, lamb: float, lame: float):
    """``InfLoRA`` with the attributes its ``__init__`` reads from the config (Adam, as published)."""
    learner = ref.inflora.InfLoRA.__new__(ref.inflora.InfLoRA)
    cpu = torch.device("cpu")
    learner.__dict__.update(
        _cur_task=-1,
        _known_classes=0,
        _total_classes=0,
        _network=network,
        _device=cpu,
        _multiple_gpus=[cpu],
        _data_memory=np.array([]),
        _targets_memory=np.array([]),
        optim="adam",
        init_epoch=EPOCHS,
        epochs=EPOCHS,
        init_lr=LR,
        lrate=LR,
        init_weight_decay=0.0,
        weight_decay=0.0,
        lamb=lamb,
        lame=lame,
        total_sessions=TASKS,
        feature_list=[],
        project_type=[],
        debug=False,
    )
    return learner


def _clpeft_strategy(backbone: TimmBackbone, lamb: float, lame: float) -> LoRACL:
    strategy = LoRACL(
        backbone, targets=TARGETS, rank=RANK, alpha=float(RANK), old_updates="freeze", subspace="inflora", subspace_threshold=(lamb, lame)
    )
    strategy.attach(DataAccess("cpu", None, backbone, batch_size=BATCH))
    return strategy


def _stream() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Every task's (images in [0, 1], labels): noise plus a per-class pattern, seeded."""
    gen = torch.Generator().manual_seed(1)
    patterns = torch.rand(TASKS * CLASSES, 3, 32, 32, generator=gen)
    tasks = []
    for t in range(TASKS):
        y = torch.arange(t * CLASSES, (t + 1) * CLASSES).repeat_interleave(PER_CLASS)
        x = (0.6 * patterns[y] + 0.4 * torch.rand(len(y), 3, 32, 32, generator=gen)).clamp(0, 1)
        order = torch.randperm(len(y), generator=gen)
        tasks.append((x[order], y[order]))
    return tasks


def _train_clpeft(strategy: LoRACL, exp: Experience, x: torch.Tensor, y: torch.Tensor) -> None:
    """One experience as the engine runs it (hooks, optimizer, quarter-cosine schedule), batches in order."""
    train = TrainConfig(epochs=EPOCHS, batch_size=BATCH, lr=LR, optimizer="adam", schedule="quarter_cosine")
    optimizer = make_optimizer(strategy.param_groups(train.lr), train)
    steps_per_epoch = -(-len(y) // BATCH)
    scheduler = make_scheduler(optimizer, train, steps_per_epoch)
    for epoch in range(EPOCHS):
        strategy.train()
        strategy.epoch = epoch
        for xb, yb in zip(x.split(BATCH), y.split(BATCH)):
            optimizer_step(optimizer, strategy.training_step(Batch(xb, yb)), None)
            scheduler.step()
            strategy.after_training_step()
    strategy.eval()


def _protected(learner, layer: int) -> torch.Tensor:
    """The projection onto the official subspace of ``layer``, whichever DualGPM stores."""
    basis = torch.from_numpy(np.asarray(learner.feature_list[layer], dtype=np.float64))
    projection = basis @ basis.T
    return projection if learner.project_type[layer] == "remove" else torch.eye(len(basis), dtype=torch.float64) - projection


def _attention_layers(ref, network) -> list:
    return [m for m in network.modules() if isinstance(m, ref.vit.Attention_LoRA)]


def _run_both(ref, lamb: float, lame: float):
    """Run the three tasks on both sides; yields after each task (learner, network, strategy, task)."""
    backbone = _backbone()
    network = _official_network(ref, backbone)
    learner = _official_learner(ref, network, lamb, lame)
    strategy = _clpeft_strategy(backbone, lamb, lame)
    data = _stream()
    for t, (x, y) in enumerate(data):
        classes = list(range(t * CLASSES, (t + 1) * CLASSES))
        exp = Experience(
            index=t,
            train=DataView.of(ArrayDataset(x, y, f"task{t}")),
            test=None,
            classes_in_this_experience=classes,
            classes_seen_so_far=list(range((t + 1) * CLASSES)),
            stream_length=TASKS,
        )
        strategy.eval()
        strategy.before_experience(exp)
        trainable = {id(p) for g in strategy.param_groups(LR) for p in g["params"]}
        assert trainable == {id(m.lora_B) for m in strategy.lora.values()} | {id(p) for p in strategy.head.parameters()}
        # the official incremental_train up to _train, with clpeft's new head rows in the new classifier
        learner._cur_task += 1
        learner._total_classes = learner._known_classes + CLASSES
        network.update_fc(learner._total_classes)
        with torch.no_grad():
            network.classifier_pool[t].weight.copy_(strategy.head.weight[classes])
            network.classifier_pool[t].bias.copy_(strategy.head.bias[classes])
        loader = [(None, backbone.preprocess(xb), yb) for xb, yb in zip(x.split(BATCH), y.split(BATCH))]
        learner._train(loader, None)
        learner.after_task()
        _train_clpeft(strategy, exp, x, y)
        strategy.after_experience(exp)
        yield learner, network, strategy, t


# ------------------------------------------------------------------------------------ task loop


@pytest.mark.parametrize("lamb, lame", [(0.95, 1.0), (0.995, 1.0)], ids=["cifar100-thresholds", "retain-mode"])
def test_three_tasks_equal_the_official_train_loop(ref, lamb, lame):
    """Designed ``A``, trained ``B_t A_t``, heads, subspaces and logits equal the official ones after every task.

    ``(0.95, 1.0)`` are the published CIFAR-100 thresholds; at ``(0.995, 1.0)`` the protected
    subspace passes half the width after the second task, so DualGPM switches to storing its
    complement (``retain``) and designs ``A`` from it. Tolerances (float32 on the official side,
    float64 statistics on clpeft's): ``A`` 1e-4 after aligning each row's sign (an SVD's vectors
    have no sign), ``B_t A_t`` and logits 1e-4, heads 1e-5, projections 1e-4 (so the subspace
    sizes are equal). Mutations checked: ``A = U_r^T / sqrt(3)`` with another divisor, the energy
    of the plain eigenvalues (``gram = cov``), GPM's count on the first task (``below + 1``),
    ``progress`` off by one task, and ``schedule: cosine`` in ``_train_clpeft`` each fail it.
    """
    held_out = torch.rand(5, 3, 32, 32, generator=torch.Generator().manual_seed(9))
    retained = False
    for learner, network, strategy, t in _run_both(ref, lamb, lame):
        attentions = _attention_layers(ref, network)
        rows = slice(t * RANK, (t + 1) * RANK)
        for block, attention in enumerate(attentions):
            k, v = (strategy.lora[f"net.blocks.{block}.attn.qkv.{p}"] for p in "kv")
            official_a = attention.lora_A_k[t].weight.detach().double()
            assert torch.equal(attention.lora_A_v[t].weight, attention.lora_A_k[t].weight)
            for layer, official_b in ((k, attention.lora_B_k[t]), (v, attention.lora_B_v[t])):
                a = layer.frozen_A[rows].double()
                signs = torch.sign((a * official_a).sum(1, keepdim=True))
                torch.testing.assert_close(a * signs, official_a, rtol=0, atol=1e-4)
                ours = (layer.frozen_B[:, rows] * layer.frozen_scaling[rows]) @ layer.frozen_A[rows]
                theirs = official_b.weight.detach() @ attention.lora_A_k[t].weight.detach()
                assert theirs.abs().max() > 1e-3  # trained
                torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)
            subspace = strategy.subspace
            for i, name in enumerate(strategy.lora):
                if name.startswith(f"net.blocks.{block}."):
                    basis = subspace.basis(i)
                    torch.testing.assert_close(basis @ basis.T, _protected(learner, block), rtol=0, atol=1e-4)
            retained |= learner.project_type[block] == "retain"
        classes = list(range(t * CLASSES, (t + 1) * CLASSES))
        torch.testing.assert_close(strategy.head.weight[classes], network.classifier_pool[t].weight, rtol=0, atol=1e-5)
        torch.testing.assert_close(strategy.head.bias[classes], network.classifier_pool[t].bias, rtol=0, atol=1e-5)
        with torch.no_grad():
            torch.testing.assert_close(
                strategy.predict(held_out), network.interface(strategy.backbone.preprocess(held_out)), rtol=0, atol=1e-4
            )
    assert retained == (lamb > 0.99)


# ------------------------------------------------------------------------------------ DualGPM alone


def _feature_matrices(seed: int, d: int = 16, n_tasks: int = 4) -> list[np.ndarray]:
    """Input covariances of ``n_tasks`` tasks sharing some directions (float32, as the official stores them)."""
    rng = np.random.default_rng(seed)
    mixing = rng.normal(size=(d, d))
    mats = []
    for t in range(n_tasks):
        x = rng.normal(size=(200, d)) * np.geomspace(4, 0.05, d) @ np.linalg.qr(mixing + t * rng.normal(size=(d, d)))[0]
        mats.append((x.T @ x / 200).astype(np.float32))
    return mats


def _official_dual_gpm(ref, lamb: float, lame: float, tasks: int):
    learner = ref.inflora.InfLoRA.__new__(ref.inflora.InfLoRA)
    learner.__dict__.update(lamb=lamb, lame=lame, total_sessions=tasks, feature_list=[], project_type=[])
    return learner


@pytest.mark.parametrize("lamb, lame", [(0.95, 1.0), (0.98, 1.0), (0.995, 1.0)])
def test_subspace_updates_equal_update_dual_gpm(ref, lamb, lame):
    """``InputSubspace.extend`` (``criterion="inflora"``) selects what ``update_DualGPM`` selects.

    Four tasks of 16-dimensional feature matrices, thresholds on the official schedule; by the
    last task the subspace passes half the dimension and DualGPM stores the complement
    (``retain``), so both of its update branches are compared. Equal:
    the number of directions added per task (exactly) and the protected subspace (projections,
    1e-4: the official SVDs run in float32). Mutations checked: plain eigenvalues as energy and
    ``below + 1`` on the first task each fail it.
    """
    mats = _feature_matrices(seed=int(lamb * 1000))
    learner = _official_dual_gpm(ref, lamb, lame, len(mats))
    subspace = InputSubspace({"l": LoRALinear(nn.Linear(16, 4), rank=1, alpha=1.0)}, threshold=(lamb, lame))
    protected = 0
    for t, mat in enumerate(mats):
        learner._cur_task = t
        learner.update_DualGPM([torch.from_numpy(mat)])
        added = subspace.extend([torch.from_numpy(mat).double()], progress=t / len(mats))[0]
        official = _protected(learner, 0)
        assert added == round(float(torch.trace(official))) - protected
        protected += added
        torch.testing.assert_close(subspace.basis(0) @ subspace.basis(0).T, official, rtol=0, atol=1e-4)
    assert learner.project_type[0] == "retain"


def test_first_task_keeps_one_direction_where_the_first_already_passes_the_threshold(ref):
    """``update_DualGPM`` keeps ``max(r, 1)`` directions after the first task, ``r`` counting the
    cumulative shares below the threshold: with one dominant direction ``r = 0`` and one is kept.
    Exact. Mutation checked: ``below`` for ``max(below, 1)`` in ``InputSubspace`` fails it."""
    mat = np.diag([10.0] + [0.1] * 7).astype(np.float32)  # the first squared share is 100 / 100.07
    learner = _official_dual_gpm(ref, 0.95, 1.0, 2)
    learner._cur_task = 0
    learner.update_DualGPM([torch.from_numpy(mat)])
    subspace = InputSubspace({"l": LoRALinear(nn.Linear(8, 4), rank=1, alpha=1.0)}, threshold=(0.95, 1.0))
    assert subspace.extend([torch.from_numpy(mat).double()]) == [learner.feature_list[0].shape[1]] == [1]
    torch.testing.assert_close(subspace.basis(0) @ subspace.basis(0).T, _protected(learner, 0), rtol=0, atol=1e-6)


def test_gpm_criterion_keeps_more_directions_than_the_official_rule(ref):
    """The deliberate alternative: GPM's energy (eigenvalues of the covariance) at the official
    threshold protects more directions than ``update_DualGPM`` (their squares) on the same matrices.

    ``subspace: gpm`` is GPM's paper definition, not what produced InfLoRA's numbers; this is the
    gap the default closes. Mutation checked: setting the default criterion to ``gpm`` makes the
    first assertion's counts equal and fails it.
    """
    mats = _feature_matrices(seed=3)
    learner = _official_dual_gpm(ref, 0.95, 1.0, len(mats))
    layer = {"l": LoRALinear(nn.Linear(16, 4), rank=1, alpha=1.0)}
    official, gpm = InputSubspace(layer, threshold=(0.95, 1.0)), InputSubspace(layer, threshold=(0.95, 1.0), criterion="gpm")
    learner._cur_task = 0
    learner.update_DualGPM([torch.from_numpy(mats[0])])
    assert official.extend([torch.from_numpy(mats[0]).double()])[0] == learner.feature_list[0].shape[1]
    assert gpm.extend([torch.from_numpy(mats[0]).double()])[0] > learner.feature_list[0].shape[1] + 1


def test_official_update_fails_where_the_first_task_spans_over_half_the_width(ref):
    """A documented difference: a first task whose subspace needs more than half of ``d``.

    ``update_DualGPM`` then stores the subspace ``M`` but labels it ``retain`` (the label of a
    stored *complement*) and its own summary asserts ``dim <= d / 2``: the official run stops
    with an ``AssertionError``. clpeft keeps ``M`` as selected (12 of 16 directions here).
    """
    d = 16
    mat = np.diag(np.linspace(1.0, 0.9, d)).astype(np.float32)  # a flat spectrum: most directions are needed
    learner = _official_dual_gpm(ref, 0.8, 1.0, 2)
    learner._cur_task = 0
    with pytest.raises(AssertionError):
        learner.update_DualGPM([torch.from_numpy(mat)])
    assert learner.project_type == ["retain"] and learner.feature_list[0].shape[1] > d / 2
    subspace = InputSubspace({"l": LoRALinear(nn.Linear(d, 4), rank=1, alpha=1.0)}, threshold=0.8)
    assert subspace.extend([torch.from_numpy(mat).double()]) == [learner.feature_list[0].shape[1]]


# ------------------------------------------------------------------------------------ published configs

# configs/cifar100_inflora.json and configs/mimg10_inflora.json of liangyanshuo/InfLoRA at the pinned
# commit (the JSON files are not in the reference folder): init_epoch = epochs, init_lr = lrate,
# batch_size, rank, lamb, lame, optim "adam", weight decay 0, init_cls = increment, shuffle false.
OFFICIAL_CONFIGS = {
    "cifar100_10t.yaml": dict(epochs=20, lr=0.0005, batch_size=128, rank=10, lamb=0.95, lame=1.0, per_task=10, n_classes=100),
    "imagenet_r_10t.yaml": dict(epochs=50, lr=0.0005, batch_size=128, rank=10, lamb=0.98, lame=1.0, per_task=20, n_classes=200),
}


@pytest.mark.parametrize("ours", sorted(OFFICIAL_CONFIGS))
def test_published_configs_are_the_official_setup(ref, ours):
    """``configs/lora_cl/{cifar100,imagenet_r}_10t.yaml`` hold what the official JSON configs run.

    The JSON values above; from ``methods/inflora.py``: Adam with betas (0.9, 0.999) and its
    per-epoch ``CosineSchedule`` (clpeft's ``quarter_cosine``), LoRA on k and v only (``Attention_LoRA``),
    no scaling (``B A`` added as is: ``alpha = rank``); from ``models/sinet_inflora.py``:
    ``vit_base_patch16_224_in21k``, whose weights (``models/vit_inflora.py``'s ``default_cfgs``) are
    augreg's IN-21k checkpoint, ``vit_base_patch16_224.augreg_in21k`` in today's timm; from its
    ``utils/data.py`` (official repository): [0, 1] inputs (``Normalize(0, 1)``), training
    RandomResizedCrop(224) + flip, testing Resize(224) on CIFAR-100 and Resize(256) + CenterCrop(224)
    on ImageNet-R; float32. Mutation checked: ``subspace_threshold: [0.9, 1.0]`` in the YAML fails it.
    """
    official = OFFICIAL_CONFIGS[ours]
    cfg = clpeft.config.load(CONFIGS / ours)
    train, strategy, scenario, backbone = cfg.train, cfg.strategy.params, cfg.scenario.params, cfg.backbone.params
    assert (train.epochs, train.lr, train.batch_size) == (official["epochs"], official["lr"], official["batch_size"])
    assert (train.optimizer, train.weight_decay, train.schedule) == ("adam", 0.0, "quarter_cosine")
    param = nn.Parameter(torch.zeros(1))
    assert make_optimizer([{"params": [param]}], train).defaults["betas"] == (0.9, 0.999)
    assert not train.drop_last and train.amp == "off" and train.augment == "crop_flip_coda"
    assert strategy["rank"] == official["rank"] == strategy["alpha"]
    assert strategy["subspace"] == "inflora" and tuple(strategy["subspace_threshold"]) == (official["lamb"], official["lame"])
    assert strategy["targets"] == TARGETS and backbone["split_qkv"] and strategy["old_updates"] == "freeze"
    assert scenario["n_experiences"] == official["n_classes"] // official["per_task"] and scenario.get("class_order") is None
    assert (backbone["mean"], backbone["std"]) == ([0, 0, 0], [1, 1, 1])
    assert backbone.get("crop_pct") == (0.875 if official["n_classes"] == 200 else None)
    assert backbone["model"] == "vit_base_patch16_224.augreg_in21k" and backbone["pretrained"]
    assert timm.models.get_pretrained_cfg(backbone["model"]).url == ref.vit.default_cfgs["vit_base_patch16_224_in21k"]["url"]
