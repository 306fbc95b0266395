"""LAE against the official code, gqk/LAE (``shared/refs/lae``).

The official learner (``main.py``'s ``MyModule``: ``create_pets_vit`` / ``attach_pets_vit`` with
``pet_cls: LoRA``, i.e. one ``KVLoRA`` per block of ``adapt_blocks`` (``libml/model/pet/lora.py``:
rank-5 ``B A`` on the key and on the value rows of ``qkv``, each with a learnable ``Scaler``);
``pre_train_epoch``'s PET freezing for ``num_freeze_epochs``; ``train_step``'s cross-entropy on the
new classes' logits; ``post_train_step``'s ``ModelEmaV2`` update of the offline PET; ``eval_epoch``'s
maximum over the online and offline softmax outputs) runs beside clpeft's ``lae`` strategy, its
hooks driven as the engine drives them (``make_optimizer``, ``optimizer_step``,
``after_training_step``), on the same tiny random ViT (timm's ``test_vit``: width 64, 2 heads, 6
blocks, at 32 px; the official ``libml/model/backbone/vit.py`` gets its weights with ``qkv`` fused,
clpeft's ``backbone.split_qkv`` gives it separate ``qkv.k`` / ``qkv.v`` linears), the same PET
initialisation, the same head rows and the same seeded batches, over three tasks with the PET
frozen for the first epoch of tasks 2 and 3. Compared after every task: every online factor and
scale, every offline (EMA) factor and scale, the head, the ensemble's probabilities and the plain
forward with trained, non-unit scales.

Shims, all from the test side:

* ``libml.core`` and ``libml.data`` (the trainer, its ``Module`` base and the data pipeline) are not
  in the reference folder: ``Module.forward`` is the official ``self.model(...)``, the rest are
  empty; the per-task steps of the official ``Module.setup_model`` (append the task's classifier
  to the head, train mode) and ``create_optimizer`` (``optim.Adam`` over the head and the PETs
  with ``lr`` and ``weight_decay: 0``; ``schedule_unit: none``, so the rate stays constant) are
  made in the test, read off the official repository at the pinned commit;
* ``libml.model.backbone.swin`` / ``convnext`` import names timm no longer has and only serve
  other backbones: stubs with the class names ``main.py`` tests ``isinstance`` against;
* ``timm.models.layers.helpers.to_2tuple`` is timm's ``to_2tuple`` (timm 1.0 moved it);
* ``torchmetrics.Accuracy`` records what the learner scores (the official version took no
  ``task``); ``val_acc`` thereby hands over ``eval_epoch``'s ensembled probabilities;
* ``nn.Parameter.__format__`` formats a 0-dim parameter as its value while the reference is
  loaded: ``setup_model`` logs the PETs, whose ``Scaler.extra_repr`` formats its parameter with
  ``:.4f``, which this torch refuses for tensor subclasses;
* ``dataclasses.dataclass`` gives the classes it makes ``object.__hash__``: ``main.py``'s
  ``MyConf`` has a ``MyModuleConf()`` instance as a default, which Python >= 3.11 refuses for an
  unhashable class (the official environment ran Python 3.8).
"""

from __future__ import annotations

import copy
import dataclasses
import importlib
import inspect
import types
import warnings
from pathlib import Path

import pytest
import timm.layers
import torch
import yaml
from torch import nn

import clpeft.config
from clpeft.backbones.timm_backbone import TimmBackbone
from clpeft.config import TrainConfig
from clpeft.data import ArrayDataset, Batch, DataView
from clpeft.data_access import DataAccess
from clpeft.experience import Experience
from clpeft.strategies.lae import LAE
from clpeft.training import make_optimizer, optimizer_step

WIDTH, RANK, TASKS, CLASSES = 64, 5, 3, 2  # test_vit's width; the official rank; tasks; classes per task
BLOCKS = [0, 1, 2, 3, 4]  # the official adapt_blocks
PER_CLASS, BATCH, EPOCHS, FREEZE, LR, MOMENTUM = 6, 4, 3, 1, 3e-3, 0.8
TARGETS = [f"blocks.{b}.attn.qkv.{p}" for b in BLOCKS for p in "kv"]
CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "lae"


class _Accuracy:
    """``torchmetrics.Accuracy`` as far as the learner uses it; keeps what it was given."""

    def __init__(self, *args, **kwargs):
        self.outputs = []

    def update(self, output, target):
        self.outputs.append(output.detach().clone())

    def compute(self):
        return torch.zeros(())

    def reset(self):
        self.outputs = []


class _Module(nn.Module):
    """The official ``libml.core.Module`` as far as ``MyModule`` uses it on the tested path."""

    def setup_model(self):
        pass

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)


def _hashable_dataclass(cls=None, **kwargs):
    def wrap(c):
        made = dataclasses.dataclass(c, **kwargs)
        made.__hash__ = object.__hash__
        return made

    return wrap if cls is None else wrap(cls)


def _format_scalar(self, spec: str) -> str:
    """A 0-dim parameter formats as its value (``Scaler.extra_repr``'s ``{self.scale:.4f}``)."""
    return format(self.item(), spec) if self.dim() == 0 else object.__format__(self, spec)


@pytest.fixture(scope="module")
def ref(load_reference, stub_module):
    """The official ``main`` (``MyModule``), ``libml.model`` and its ViT (shims above), imported once."""
    empty_conf = dataclasses.dataclass(type("Conf", (), {}))
    stubs = {
        "libml.core": stub_module(
            "libml.core",
            App=None,
            Conf=empty_conf,
            DataModule=object,
            Module=_Module,
            ModuleConf=dataclasses.dataclass(type("ModuleConf", (), {})),
        ),
        "libml.data": stub_module("libml.data", build_imagenet_transform=None),
        "libml.model.backbone.swin": stub_module(
            "libml.model.backbone.swin", SwinTransformer=type("SwinTransformer", (), {}), swin_base_patch4_window7_224_in22k=None
        ),
        "libml.model.backbone.convnext": stub_module(
            "libml.model.backbone.convnext", ConvNeXt=type("ConvNeXt", (), {}), convnext_base_in22k=None
        ),
        "timm.models.layers.helpers": stub_module("timm.models.layers.helpers", to_2tuple=timm.layers.to_2tuple),
        "torchmetrics": stub_module("torchmetrics", Accuracy=_Accuracy),
        "dataclasses": stub_module("dataclasses", **{**vars(dataclasses), "dataclass": _hashable_dataclass}),
    }
    with warnings.catch_warnings(), pytest.MonkeyPatch.context() as patch:
        warnings.simplefilter("ignore", FutureWarning)  # the reference imports timm's deprecated module paths
        patch.setattr(nn.Parameter, "__format__", _format_scalar, raising=False)
        with load_reference("lae", "main", stubs=stubs) as main:
            yield types.SimpleNamespace(
                main=main, model=importlib.import_module("libml.model"), vit=importlib.import_module("libml.model.backbone.vit")
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


def _official_learner(ref, backbone: TimmBackbone):
    """``MyModule`` around the official ``Model`` (its ViT holding ``backbone``'s weights, its
    ``create_head``), configured as ``config/vit_lora.yaml`` with this test's momentum and freeze."""
    vit = ref.vit.VisionTransformer(img_size=32, patch_size=16, embed_dim=WIDTH, depth=6, num_heads=2, mlp_ratio=3)
    vit.load_state_dict(_fused_state(backbone), strict=True)
    model = ref.model.Model.__new__(ref.model.Model)
    nn.Module.__init__(model)
    model.cfg = types.SimpleNamespace(backbone="ViT-B_16", head_kwargs={})
    model.backbone = vit
    model.head = model.create_head()
    learner = ref.main.MyModule.__new__(ref.main.MyModule)
    nn.Module.__init__(learner)
    learner.cfg = types.SimpleNamespace(
        adapt_blocks=BLOCKS,
        pet_cls="LoRA",
        pet_kwargs={"rank": RANK, "scale": None},
        num_emas=1,
        ema_decay=MOMENTUM,
        num_freeze_epochs=FREEZE,
        eval_only_emas=False,
    )
    learner.model = model
    learner.datamodule = types.SimpleNamespace(num_old_classes=0, num_new_classes=CLASSES, num_classes_of=lambda t: CLASSES)
    learner.current_task = learner.current_epoch = 0
    return learner


def _clpeft_strategy(backbone: TimmBackbone) -> LAE:
    strategy = LAE(
        backbone, targets=TARGETS, rank=RANK, alpha=float(RANK), learnable_scale=True, ema_momentum=MOMENTUM, freeze_epochs=FREEZE
    )
    strategy.attach(DataAccess("cpu", None, backbone, batch_size=BATCH))
    return strategy


def _copy_pet_init(strategy: LAE, pets) -> None:
    """clpeft's initial online factors into the official ``KVLoRA``s (both draw A as ``nn.Linear`` does)."""
    with torch.no_grad():
        for i, block in enumerate(BLOCKS):
            for j, part in enumerate("kv"):
                layer = strategy.lora[f"net.blocks.{block}.attn.qkv.{part}"]
                pets[i].lora_A[j].copy_(layer.lora_A)
                pets[i].lora_B[j].copy_(layer.lora_B)
                pets[i].scale[j].scale.copy_(layer.lora_scale)


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


def _train_official(learner, t: int, x: torch.Tensor, y: torch.Tensor) -> None:
    """One task of the official ``Module.run``/``train_epoch`` with ``MyModule``'s hooks."""
    optimizer = torch.optim.Adam(nn.ModuleList([learner.model.head, learner.pets]).parameters(), lr=LR, weight_decay=0.0)
    learner.datamodule.num_old_classes = t * CLASSES
    for learner.current_epoch in range(EPOCHS):
        learner.pre_train_epoch()
        optimizer.zero_grad()
        for i, batch in enumerate(zip(x.split(BATCH), y.split(BATCH))):
            loss, _ = learner.train_step(batch, i)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            learner.post_train_step()


def _train_clpeft(strategy: LAE, x: torch.Tensor, y: torch.Tensor) -> None:
    """One experience as the engine runs it (hooks, optimizer, constant rate), batches in order."""
    train = TrainConfig(epochs=EPOCHS, batch_size=BATCH, lr=LR, optimizer="adam")
    optimizer = make_optimizer(strategy.param_groups(train.lr), train)
    for epoch in range(EPOCHS):
        strategy.train()
        strategy.epoch = epoch
        for xb, yb in zip(x.split(BATCH), y.split(BATCH)):
            optimizer_step(optimizer, strategy.training_step(Batch(xb, yb)), None)
            strategy.after_training_step()
    strategy.eval()


def _pet_values(pets) -> dict[str, torch.Tensor]:
    """The official PETs' factors and scales under clpeft's layer names."""
    values = {}
    for i, block in enumerate(BLOCKS):
        for j, part in enumerate("kv"):
            name = f"net.blocks.{block}.attn.qkv.{part}"
            values[f"{name}.lora_A"] = pets[i].lora_A[j].detach()
            values[f"{name}.lora_B"] = pets[i].lora_B[j].detach()
            values[f"{name}.lora_scale"] = pets[i].scale[j].scale.detach()
    return values


def _run_both(ref):
    """Run the three tasks on both sides; yields after each task (learner, strategy, task)."""
    backbone = _backbone()
    learner = _official_learner(ref, backbone)
    strategy = _clpeft_strategy(backbone)
    for t, (x, y) in enumerate(_stream()):
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
        # the official Module.setup_model's part for a new task, then MyModule's own, then clpeft's head rows
        learner.current_task = t
        learner.model.head.append(CLASSES)
        learner.model.train()
        learner.setup_model()
        if t == 0:
            _copy_pet_init(strategy, learner.pets)
        with torch.no_grad():
            learner.model.head.classifiers[t].weight.copy_(strategy.head.weight[classes])
            learner.model.head.classifiers[t].bias.copy_(strategy.head.bias[classes])
        _train_official(learner, t, backbone.preprocess(x), y)
        _train_clpeft(strategy, x, y)
        strategy.after_experience(exp)
        yield learner, strategy, t


# ------------------------------------------------------------------------------------ the tests


def test_three_tasks_equal_the_official_learner(ref):
    """Online and offline PETs, head and ensemble equal the official learner's after every task.

    Tolerances (float32 on both sides, the official LoRA adds ``s B A`` to the weight, clpeft adds
    ``s x A^T B^T`` to the output): factors, scales and head 2e-5, probabilities 1e-5. Mutations
    checked: ``learnable_scale: false``, the EMA update skipped in ``after_training_step``, the
    online module frozen for one epoch less, ``lora_scale`` ignored in ``LoRALinear.forward``, and
    the ensemble's ``torch.maximum`` replaced by the mean each fail it.
    """
    held_out = torch.rand(5, 3, 32, 32, generator=torch.Generator().manual_seed(9))
    for learner, strategy, t in _run_both(ref):
        online = {
            f"{name}.{f}": getattr(layer, f).detach() for name, layer in strategy.lora.items() for f in ("lora_A", "lora_B", "lora_scale")
        }
        official = _pet_values(learner.pets)
        assert online.keys() == official.keys()
        for key, value in official.items():
            torch.testing.assert_close(online[key], value, rtol=0, atol=2e-5, msg=key)
        assert any(float(v) != 1.0 for k, v in online.items() if k.endswith("lora_scale"))  # the scales trained
        if t > 0:  # the offline PET exists from the second task on
            offline = strategy.offline.model.overrides()
            for key, value in _pet_values(learner.pets_emas[0].module).items():
                torch.testing.assert_close(offline[key], value, rtol=0, atol=2e-5, msg=key)
            assert any((offline[k] - online[k]).abs().max() > 1e-4 for k in online)  # an average, not a copy
        weights = torch.cat([c.weight for c in learner.model.head.classifiers])
        biases = torch.cat([c.bias for c in learner.model.head.classifiers])
        torch.testing.assert_close(strategy.head.weight, weights, rtol=0, atol=2e-5)
        torch.testing.assert_close(strategy.head.bias, biases, rtol=0, atol=2e-5)
        learner.val_acc = _Accuracy()  # eval_epoch scores the ensemble's probabilities here
        learner.val_task_accs = learner.val_task_local_accs = [_Accuracy()] * TASKS
        task_ids = torch.zeros(len(held_out), dtype=torch.long)
        with torch.no_grad():
            learner.eval_epoch([(strategy.backbone.preprocess(held_out), torch.zeros(len(held_out)), task_ids)])
            torch.testing.assert_close(strategy.predict(held_out).exp(), learner.val_acc.outputs[0], rtol=0, atol=1e-5)


def test_pet_forward_equals_kvlora_with_trained_scales(ref):
    """The forward of LoRA on ``qkv.k`` / ``qkv.v`` with learnable scales equals the official ``KVLoRA``
    attached to ``qkv`` (q rows untouched), with random factors and scales away from 1.

    Tolerance 1e-5 (float32, the official update is added to the weight). Mutation checked:
    ``lora_scale`` ignored in ``LoRALinear.forward`` fails it.
    """
    backbone = _backbone()
    learner = _official_learner(ref, backbone)
    strategy = _clpeft_strategy(backbone)
    learner.current_task = 0
    learner.model.head.append(CLASSES)
    learner.setup_model()
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for layer in strategy.lora.values():
            layer.lora_B.copy_(0.1 * torch.randn(layer.lora_B.shape, generator=gen))
            layer.lora_scale.fill_(float(torch.rand((), generator=gen)) + 0.5)
    _copy_pet_init(strategy, learner.pets)
    x = torch.rand(3, 3, 32, 32, generator=gen)
    with torch.no_grad():
        tokens = learner.model.backbone(backbone.preprocess(x))
        torch.testing.assert_close(strategy.backbone(x), tokens[:, 0], rtol=0, atol=1e-5)
        plain = copy.deepcopy(learner.model.backbone)
        for block in BLOCKS:
            plain.blocks[block].attn.detach_adapter("qkv")
        assert (plain(backbone.preprocess(x))[:, 0] - tokens[:, 0]).abs().max() > 1e-3  # the PET counts


def test_new_head_rows_start_as_the_official_classifier(ref):
    """New classes' rows are drawn as ``SimpleHead.weights_init`` draws them: ``N(0, 0.001^2)``
    weights, zero biases (a fixed-seed statistical comparison: the draws themselves differ).

    Over 20 classes x 64 features per side: biases exactly 0 on both; mean within 1e-4 of 0 and
    standard deviation within 10% of 0.001 on both (the sampling error of 1,280 draws is ~2%).
    Mutation checked: ``std=0.01`` in ``LAE.before_experience`` fails it.
    """
    torch.manual_seed(5)
    strategy = _clpeft_strategy(_backbone())
    strategy.before_experience(
        Experience(
            index=0, train=None, test=None, classes_in_this_experience=list(range(20)), classes_seen_so_far=list(range(20)), stream_length=1
        )
    )
    head = ref.model.DynamicSimpleHead(num_features=WIDTH)
    head.append(20)
    for weight, bias in ((strategy.head.weight, strategy.head.bias), (head.classifiers[0].weight, head.classifiers[0].bias)):
        assert torch.equal(bias, torch.zeros(20))
        weight = weight.detach()
        assert abs(float(weight.mean())) < 1e-4 and abs(float(weight.std()) - 0.001) < 1e-4


@pytest.mark.parametrize(
    ("ours", "base", "n_classes"),
    [
        ("cifar100_10t.yaml", "cifar100_order1.yaml", 100),
        ("imagenet_r_10t.yaml", "imagenet-r_order1.yaml", 200),
    ],
)
def test_published_configs_are_the_official_setup(ref, ours, base, n_classes):
    """``configs/lae/{cifar100,imagenet_r}_10t.yaml`` hold what ``make [BASE=...] vit_lora`` runs.

    From ``config/vit_lora.yaml`` over ``config/base/<dataset>_order1.yaml``: the LoRA PET on
    ``adapt_blocks`` with its rank and learnable scale (``scale: null``), epochs, batch size and
    ``drop_last``, Adam, lr, weight decay, a constant rate (``schedule_unit: none``: the scheduler is
    never stepped), EMA decay, ``num_freeze_epochs``, the increment, the natural class order and
    float32 (``precision: 32``); from ``main.py``: ViT-B_16 is ``vit_b16_in21k``, the original
    ImageNet-21k checkpoint (``imagenet21k/ViT-B_16.npz``; ``vit_base_patch16_224.orig_in21k`` in
    today's timm), inputs not normalised (``norm=False``); from ``libml/data/transform.py`` (in the
    official repository, not the reference folder): RandomResizedCrop(224) + flip for training,
    Resize(256) + CenterCrop(224) for testing. Mutation checked: lr 0.003 in the YAML fails it.
    """
    root = Path(ref.main.__file__).parent
    lora = yaml.safe_load((root / "config" / "vit_lora.yaml").read_text())["module"]
    official = yaml.safe_load((root / "config" / "base" / base).read_text())
    data, module = official["data"], official["module"]
    cfg = clpeft.config.load(CONFIGS / ours)
    train, strategy, scenario, backbone = cfg.train, cfg.strategy.params, cfg.scenario.params, cfg.backbone.params
    assert lora["pet_cls"] == "LoRA" and lora["model"]["backbone"] == "ViT-B_16"
    assert strategy["targets"] == [f"blocks.{b}.attn.qkv.{p}" for b in lora["adapt_blocks"] for p in "kv"]
    assert backbone["split_qkv"] and strategy["rank"] == lora["pet_kwargs"]["rank"] == strategy["alpha"]
    assert lora["pet_kwargs"]["scale"] is None and strategy.get("learnable_scale", True)
    assert (train.epochs, train.batch_size, train.lr) == (module["num_epochs"], data["dataloader"]["batch_size"], module["optimizer"]["lr"])
    assert train.drop_last == data["dataloader"]["drop_last"] is True
    assert (train.optimizer, module["optimizer"]["algo"], train.weight_decay) == ("adam", "Adam", module["optimizer"]["weight_decay"])
    assert module["schedule_unit"] == "none" and train.schedule == "constant"
    assert (strategy["ema_momentum"], strategy["freeze_epochs"]) == (module["ema_decay"], module["num_freeze_epochs"])
    assert data["num_init_classes"] == 0 and scenario["n_experiences"] == n_classes // data["num_increment_classes"]
    assert data["class_order"] is None and scenario.get("class_order") is None
    assert official["precision"] == 32 and train.amp == "off"
    assert ref.model._BACKBONE["ViT-B_16"] is ref.vit.vit_b16_in21k
    assert ref.vit.default_cfgs["vit_b16_in21k"]["url"].endswith("/imagenet21k/ViT-B_16.npz")
    assert backbone["model"] == "vit_base_patch16_224.orig_in21k" and backbone["pretrained"]
    assert "build_imagenet_transform(train=True, norm=False)" in inspect.getsource(ref.main.MyDataModule)
    assert (backbone["mean"], backbone["std"]) == ([0, 0, 0], [1, 1, 1])
    assert train.augment == "crop_flip_coda" and backbone["crop_pct"] == 0.875  # RandomResizedCrop(224); Resize(256)
