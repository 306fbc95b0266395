"""CODA-Prompt against the official code, GT-RIPL/CODA-Prompt (``shared/refs/coda-prompt``).

Both sides run on the same tiny random ViT (timm's ``test_vit``: width 64, 2 heads, 6 blocks, at
32 px; the reference's own ``models/vit.py`` ``VisionTransformer`` gets clpeft's weights) with the
same prompt components, head and seeded inputs. Compared: the prompt module's prefixes per layer
(``CodaPrompt.forward``), its orthogonality penalty, the Gram-Schmidt initialisation given the
same seeded draws, the prefix attention of one block, the full forward (``ViTZoo.forward``), and
the official learner's loss, Adam steps and cosine schedule (``learners/prompt.py`` ``update_model``,
``init_optimizer``) across a task switch, with past components frozen. The one deliberate difference
(exact orthogonality to trained earlier components) is shown, and the published configs are checked
against the official run scripts and configs.

Shims, all from the test side: the reference calls ``.cuda()`` on the identity matrix of its
penalty and on its prompt-loss accumulator, so ``torch.Tensor.cuda`` returns a copy on the CPU
(a copy, because the accumulator is a leaf that is then added to in place, which only a non-leaf
allows, as on a GPU); ``utils.metric`` (accuracy meters, absent from the folder) is a stub; the
official ``ViTZoo`` builds ViT-B/16 with downloaded weights, so the tests assemble one around the
tiny reference ViT without calling its ``__init__``, and the learner likewise.
"""

from __future__ import annotations

import copy
import importlib
import re
import types
import warnings
from pathlib import Path

import pytest
import timm
import torch
import yaml
from torch import nn

import clpeft.config
from clpeft.backbones import vit as clpeft_vit
from clpeft.backbones.timm_backbone import TimmBackbone
from clpeft.components.prompts.attention_prompt_pool import AttentionPromptPool
from clpeft.config import TrainConfig
from clpeft.data import Batch
from clpeft.experience import Experience
from clpeft.strategies.coda_prompt import CodaPrompt
from clpeft.training import make_optimizer, make_scheduler, optimizer_step

WIDTH, LENGTH, PER_TASK, TASKS = 64, 8, 3, 2  # test_vit's width; L_p; components per task; tasks
LAYERS = [0, 1, 2, 3, 4]  # the official e_layers (fixed in its CodaPrompt._init_smart)
POOL = PER_TASK * TASKS
SHORT = {"prompts": "p", "keys": "k", "attention": "a"}  # the official attribute names: e_p_<layer>, ...
CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "coda_prompt"


@pytest.fixture
def ref(load_reference, stub_module, monkeypatch):
    """The reference's ``models.zoo``, ``models.vit`` and ``learners.prompt`` (with the shims above)."""
    monkeypatch.setattr(torch.Tensor, "cuda", lambda self, *args, **kwargs: self.clone())
    metric = stub_module("utils.metric", accuracy=None, AverageMeter=None, Timer=None)  # meters, never used here
    with warnings.catch_warnings():  # its timm.models.layers / helpers imports are deprecated
        warnings.simplefilter("ignore", FutureWarning)
        with load_reference("coda-prompt", "learners.prompt", stubs={"utils.metric": metric}) as prompt:
            yield types.SimpleNamespace(
                prompt=prompt,
                zoo=importlib.import_module("models.zoo"),
                vit=importlib.import_module("models.vit"),
                root=Path(prompt.__file__).parents[1],
            )


def _backbone() -> TimmBackbone:
    torch.manual_seed(0)
    return TimmBackbone((3, 32, 32), model="test_vit", img_size=32, freeze=True)


def _reference_vit(ref, backbone: TimmBackbone) -> nn.Module:
    """The reference's ViT (``models/vit.py``) holding ``backbone``'s weights (every key matches)."""
    net = ref.vit.VisionTransformer(img_size=32, patch_size=16, embed_dim=WIDTH, depth=6, num_heads=2, mlp_ratio=3)
    net.load_state_dict(backbone.net.state_dict(), strict=True)
    return net.eval()


def _reference_prompt(ref, mu: float = 0.0, tasks_done: int = TASKS - 1):
    """The official ``CodaPrompt`` (pool ``M = POOL`` over ``TASKS`` tasks) at task ``tasks_done``."""
    module = ref.zoo.CodaPrompt(WIDTH, TASKS, [POOL, LENGTH, mu], key_dim=WIDTH)
    module.task_count = tasks_done
    return module


def _stacked(pool: AttentionPromptPool, name: str, layer: int) -> torch.Tensor:
    return torch.cat([getattr(t, name)[layer] for t in pool.tasks]).detach()


def _copy_to_reference(pool: AttentionPromptPool, module) -> None:
    """clpeft's components into the first rows of the reference's ``e_p_l``, ``e_k_l``, ``e_a_l``."""
    with torch.no_grad():
        for i, layer in enumerate(LAYERS):
            for name, short in SHORT.items():
                rows = _stacked(pool, name, i)
                getattr(module, f"e_{short}_{layer}")[: len(rows)] = rows


def _reference_rows(module, name: str, layer: int, rows: slice) -> torch.Tensor:
    return getattr(module, f"e_{SHORT[name]}_{layer}")[rows].detach()


def _trained_pool(seed: int = 1) -> AttentionPromptPool:
    """``TASKS`` tasks of components moved off their orthonormal start (as training moves them)."""
    torch.manual_seed(seed)
    pool = AttentionPromptPool(LAYERS, WIDTH, LENGTH, PER_TASK, key_dim=WIDTH)
    for _ in range(TASKS):
        pool.add_task()
    with torch.no_grad():
        for p in pool.parameters():
            p.add_(0.2 * torch.randn_like(p))
    return pool


# ---------------------------------------------------------------------------------- prompt module


@pytest.mark.parametrize("train", [True, False])
def test_prefixes_per_layer_equal_the_official_prompt_module(ref, train):
    """``AttentionPromptPool(q)[l]`` is ``CodaPrompt.forward(q, l, x, train)``'s ``[Ek, Ev]``.

    At the second task, with trained (non-orthogonal) components: in training the official module
    uses the past rows detached, in evaluation all rows so far; both equal clpeft's prefixes,
    and its layers without prompts get none. Tolerance: 1e-6 absolute (float32, other summation
    order). Mutation checked: swapping the key and value halves in ``AttentionPromptPool.forward``,
    and dropping the key normalisation in ``weights``, fail it.
    """
    pool = _trained_pool()
    module = _reference_prompt(ref)
    _copy_to_reference(pool, module)
    torch.manual_seed(2)
    query, tokens = torch.randn(5, WIDTH), torch.randn(5, 3, WIDTH)
    prefixes = pool(query)
    for layer in range(6):
        official, loss, same_tokens = module.forward(query, layer, tokens, train=train, task_id=1)
        assert same_tokens is tokens and loss == 0  # mu = 0: no penalty
        if layer not in LAYERS:
            assert official is None and layer not in prefixes
            continue
        for got, expected in zip(prefixes[layer], official):
            torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)


def test_orthogonality_loss_equals_the_official_penalty_summed_over_layers(ref):
    """``mu * L_ortho`` is what the official module adds up over its layers in training.

    Its ``ortho_penalty`` of ``K``, ``A`` and the flattened ``P`` (past rows included, detached),
    times ``mu``, per prompted layer. Tolerance: 1e-5 relative. Mutation checked: ``.mean()`` ->
    ``.sum()`` in ``orthogonality_penalty`` fails it.
    """
    mu = 0.3
    pool = _trained_pool()
    module = _reference_prompt(ref, mu=mu)
    _copy_to_reference(pool, module)
    query, tokens = torch.randn(4, WIDTH), torch.randn(4, 3, WIDTH)
    official = sum(module.forward(query, layer, tokens, train=True, task_id=1)[1] for layer in range(6)).item()
    assert official > 0.1  # the trained components are far from orthogonal: the check can fail
    assert mu * pool.orthogonality_loss().item() == pytest.approx(official, rel=1e-5)


# ---------------------------------------------------------------------------------- initialisation


def test_initialisation_equals_the_official_gram_schmidt_given_the_same_seed(ref):
    """Seeded alike, ``add_task`` draws and orthonormalises what ``process_task_count`` does.

    First task: the official module's rows ``0:3`` (``task_count`` 0; its ``__init__`` draws
    them the same way after a uniform fill that ``process_task_count`` ignores); second task, after
    orthonormal first-task rows: rows ``3:6``. Same draws (per layer K, A, then P, one float32
    Gaussian vector per row), so the rows must match. Tolerance: 1e-5 absolute (float32 classical
    Gram-Schmidt against float64 QR). Mutations checked: drawing P before K, dropping the sign
    correction of the QR, and skipping the projection on earlier rows each fail it.
    """
    module = _reference_prompt(ref, tasks_done=-1)
    pool = AttentionPromptPool(LAYERS, WIDTH, LENGTH, PER_TASK, key_dim=WIDTH)
    for task in range(TASKS):
        torch.manual_seed(10 + task)
        module.process_task_count()
        torch.manual_seed(10 + task)
        pool.add_task()
        rows = slice(task * PER_TASK, (task + 1) * PER_TASK)
        for i, layer in enumerate(LAYERS):
            for name in ("keys", "attention", "prompts"):
                expected = _reference_rows(module, name, layer, rows)
                torch.testing.assert_close(getattr(pool.tasks[task], name)[i].detach(), expected, rtol=0, atol=1e-5)


def test_after_training_new_components_are_exactly_orthogonal_unlike_the_official_ones(ref):
    """Deliberate difference: orthogonal to the span of trained earlier components.

    The official classical Gram-Schmidt subtracts the projection on each earlier row separately,
    which is exact only while those rows are orthogonal; trained first-task rows are not, and its
    second-task rows keep a component along them (cosines up to 0.06 here). clpeft's are orthogonal to them to
    rounding. Handing the official code an orthonormal basis of the same span (what clpeft
    projects on) makes its rows clpeft's: the difference is that projection alone. Tolerances:
    1e-5 absolute. Mutation checked: skipping the projection in ``orthonormal_complement`` fails it.
    """
    torch.manual_seed(3)
    pool = AttentionPromptPool(LAYERS, WIDTH, LENGTH, PER_TASK, key_dim=WIDTH)
    pool.add_task()
    with torch.no_grad():
        for p in pool.parameters():
            p.add_(0.2 * torch.randn_like(p))
    official, with_basis = _reference_prompt(ref, tasks_done=0), _reference_prompt(ref, tasks_done=0)
    _copy_to_reference(pool, official)
    with torch.no_grad():  # the same span, orthonormal
        for layer in LAYERS:
            for name in ("prompts", "keys", "attention"):
                trained = _reference_rows(official, name, layer, slice(0, PER_TASK)).flatten(1)
                rows = getattr(with_basis, f"e_{SHORT[name]}_{layer}")
                rows[:PER_TASK] = torch.linalg.qr(trained.double().T).Q.T.float().view_as(rows[:PER_TASK])
    for module in (official, with_basis):
        torch.manual_seed(20)
        module.process_task_count()
    torch.manual_seed(20)
    pool.add_task()
    worst_official = 0.0
    for i, layer in enumerate(LAYERS):
        for name in ("keys", "attention", "prompts"):
            old = _reference_rows(official, name, layer, slice(0, PER_TASK)).flatten(1)
            old = old / old.norm(dim=1, keepdim=True)
            ours = getattr(pool.tasks[1], name)[i].detach().flatten(1)
            theirs = _reference_rows(official, name, layer, slice(PER_TASK, POOL)).flatten(1)
            assert (ours @ old.T).abs().max() < 1e-5
            torch.testing.assert_close(ours @ ours.T, torch.eye(PER_TASK), rtol=0, atol=1e-5)
            worst_official = max(worst_official, float((theirs @ old.T).abs().max()))
            torch.testing.assert_close(ours, _reference_rows(with_basis, name, layer, slice(PER_TASK, POOL)).flatten(1), rtol=0, atol=1e-5)
    assert worst_official > 1e-2


# ---------------------------------------------------------------------------------- forward


def _strategy(backbone: TimmBackbone, mu: float = 0.0) -> CodaPrompt:
    return CodaPrompt(backbone, components_per_task=PER_TASK, prompt_length=LENGTH, layers=LAYERS, ortho_weight=mu)


def _reference_model(ref, backbone: TimmBackbone, mu: float, n_classes: int):
    """The official ``ViTZoo`` around the tiny reference ViT (its ``__init__`` downloads ViT-B/16)."""
    model = ref.zoo.ViTZoo.__new__(ref.zoo.ViTZoo)
    nn.Module.__init__(model)
    model.feat = _reference_vit(ref, backbone)
    model.last = nn.Linear(WIDTH, n_classes)
    model.prompt = _reference_prompt(ref, mu=mu, tasks_done=0)
    model.prompt_flag, model.task_id = "coda", None
    return model


def _images(seed: int, n: int = 6) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=generator)


def test_prefix_attention_of_one_block_equals_the_official_block(ref):
    """``block_with_prefix`` is the official ``Block.forward(x, prompt=[Ek, Ev])``.

    Same block weights, tokens and prefixes (``K = [Ek; K]``, ``V = [Ev; V]``, split into heads).
    Tolerance: 1e-5 absolute. Mutation checked: ``clpeft.backbones.vit.prefix_attention`` replaced
    (monkeypatched) by one that drops the prefixes fails it, and the full-forward test.
    """
    backbone = _backbone()
    official = _reference_vit(ref, backbone)
    torch.manual_seed(4)
    tokens = torch.randn(3, 5, WIDTH)
    keys, values = torch.randn(2, 3, LENGTH // 2, WIDTH)
    with torch.no_grad():
        expected = official.blocks[2](tokens, prompt=[keys, values])
        got = clpeft_vit.block_with_prefix(backbone.net.blocks[2], tokens, keys, values)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_full_forward_equals_the_official_model(ref):
    """``CodaPrompt.predict`` is the official ``ViTZoo.forward`` (query pass, prompted pass, head).

    The official model gets the preprocessed images (its transforms normalise outside the model);
    clpeft's the raw ones and the query as the feature cache holds it. At the second task with
    trained components. Tolerance: 1e-5 absolute on the logits. Mutation checked: swapping the
    key and value halves in ``AttentionPromptPool.forward`` fails it.
    """
    backbone = _backbone()
    strategy = _strategy(backbone)
    for index in range(TASKS):
        classes = [2 * index, 2 * index + 1]
        strategy.before_experience(Experience(index, None, None, classes, list(range(2 * index + 2))))
    with torch.no_grad():
        for p in strategy.prompt_components.parameters():
            p.add_(0.2 * torch.randn_like(p))
    model = _reference_model(ref, backbone, 0.0, n_classes=4)
    model.prompt.task_count = 1
    _copy_to_reference(strategy.prompt_components, model.prompt)
    with torch.no_grad():
        model.last.weight.copy_(strategy.head.weight)
        model.last.bias.copy_(strategy.head.bias)
    x = _images(5)
    strategy.eval()
    model.eval()
    with torch.no_grad():
        got = strategy.predict(x, query=backbone(x))
        expected = model(backbone.preprocess(x))
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------- training


def _reference_learner(ref, model, lr: float, epochs: int):
    """The official ``CODAPrompt`` learner around ``model`` (its ``__init__`` builds ViT-B/16)."""
    learner = ref.prompt.CODAPrompt.__new__(ref.prompt.CODAPrompt)
    nn.Module.__init__(learner)
    learner.log = lambda *args, **kwargs: None
    learner.config = {"lr": lr, "weight_decay": 0, "optimizer": "Adam", "momentum": 0.9, "gpuid": [0]}
    learner.model = model
    learner.criterion_fn = nn.CrossEntropyLoss(reduction="none")
    learner.schedule_type, learner.schedule = "cosine", [epochs]
    learner.valid_out_dim = learner.last_valid_out_dim = 0
    return learner


@pytest.mark.parametrize("mu", [0.0, 0.1])
def test_training_equals_the_official_learner_across_a_task_switch(ref, mu):
    """Loss, Adam steps, schedule and frozen past components equal the official learner's.

    Two tasks of two classes, three epochs of one batch each. The official side runs its own
    ``update_model`` (logits of past classes to ``-inf``, mean cross-entropy, plus the prompt loss),
    ``init_optimizer`` (Adam with betas ``(momentum, 0.999)``, weight decay 0, ``CosineSchedule``
    stepped at each epoch after the first) and, between the tasks, ``process_task_count``
    (its new rows then get clpeft's values, since the init is tested above). clpeft's side is the
    engine's ``make_optimizer``/``make_scheduler``/``optimizer_step`` with ``schedule:
    quarter_cosine``. Compared: every loss, then every component and head row after each task;
    after the switch the first task's components get no gradient on either side and stay bitwise.
    Both sides run in float64: Adam divides by the root of its second moment, which blows float32
    rounding in tiny gradients up to a sizeable fraction of lr. Tolerances: 1e-9 relative on losses,
    1e-9 absolute on parameters (lr 0.01). Mutations checked:
    not freezing earlier tasks in ``add_task``, ``ortho_weight`` ignored in ``training_step`` (mu 0.1),
    and ``train_mask`` off fail it.
    """
    lr, epochs = 0.01, 3
    backbone = _backbone().double()
    strategy = _strategy(backbone, mu)
    model = _reference_model(ref, backbone, mu, n_classes=4).double()
    learner = _reference_learner(ref, model, lr, epochs)
    train = TrainConfig(epochs=epochs, lr=lr, optimizer="adam", schedule="quarter_cosine")
    for task in range(TASKS):
        classes = [2 * task, 2 * task + 1]
        strategy.before_experience(Experience(task, None, None, classes, list(range(2 * task + 2))))
        strategy.double()  # the first task's block and the grown head rows
        if task:
            model.prompt.process_task_count()
        learner.add_valid_output_dim(2)
        _copy_to_reference(strategy.prompt_components, model.prompt)
        with torch.no_grad():  # the new head rows (the official head holds every class from the start)
            model.last.weight[classes] = strategy.head.weight[classes]
            model.last.bias[classes] = strategy.head.bias[classes]
        learner.init_optimizer()
        learner.data_weighting(None)
        optimizer = make_optimizer(strategy.param_groups(lr), train)
        scheduler = make_scheduler(optimizer, train, steps_per_epoch=1)
        assert optimizer.defaults["betas"] == learner.optimizer.defaults["betas"] == (0.9, 0.999)
        frozen = copy.deepcopy(strategy.prompt_components.tasks[0].state_dict()) if task else None
        for epoch in range(epochs):
            x, y = _images(100 * task + epoch), torch.tensor(classes * 3)
            if epoch > 0:
                learner.scheduler.step()
            assert optimizer.param_groups[0]["lr"] == pytest.approx(learner.optimizer.param_groups[0]["lr"], abs=1e-12)
            model.train()
            official_loss, _ = learner.update_model(backbone.preprocess(x), y)
            strategy.train()
            with torch.no_grad():
                query = backbone(x)
            loss = strategy.training_step(Batch(x, y, query))
            assert loss.item() == pytest.approx(float(official_loss), rel=1e-9)
            optimizer_step(optimizer, loss, None)
            scheduler.step()
        for i, layer in enumerate(LAYERS):
            for name in ("prompts", "keys", "attention"):
                seen = slice(0, (task + 1) * PER_TASK)
                torch.testing.assert_close(
                    _stacked(strategy.prompt_components, name, i), _reference_rows(model.prompt, name, layer, seen), rtol=0, atol=1e-9
                )
                if task:  # the official gradient of past rows is zero (detached); clpeft's are frozen
                    assert torch.all(getattr(model.prompt, f"e_{SHORT[name]}_{layer}").grad[:PER_TASK] == 0)
        torch.testing.assert_close(strategy.head.weight, model.last.weight[: 2 * task + 2], rtol=0, atol=1e-9)
        torch.testing.assert_close(strategy.head.bias, model.last.bias[: 2 * task + 2], rtol=0, atol=1e-9)
        if task:
            after = strategy.prompt_components.tasks[0]
            assert not any(p.requires_grad for p in after.parameters())
            assert all(torch.equal(v, after.state_dict()[k]) for k, v in frozen.items())
        learner.last_valid_out_dim = learner.valid_out_dim


# ---------------------------------------------------------------------------------- published setups


def _official_coda_args(root: Path, script: str) -> list[float]:
    """``--prompt_param`` of the CODA-P command in ``experiments/<script>``."""
    text = (root / "experiments" / script).read_text()
    command = re.search(r"--learner_name CODAPrompt \\\s*--prompt_param ([\d. ]+)", text)
    return [float(v) for v in command.group(1).split()]


@pytest.mark.parametrize(
    ("ours", "config", "script", "n_classes"),
    [
        ("cifar100_10t.yaml", "cifar-100_prompt.yaml", "cifar-100.sh", 100),
        ("imagenet_r_10t.yaml", "imnet-r_prompt.yaml", "imagenet-r.sh", 200),
    ],
)
def test_published_configs_are_the_official_setup(ref, ours, config, script, n_classes):
    """``configs/coda_prompt/{cifar100,imagenet_r}_10t.yaml`` hold what the official scripts run.

    From ``configs/<dataset>_prompt.yaml``: epochs (``schedule[-1]``), batch size, Adam, lr,
    beta1 (``momentum``), weight decay, the cosine schedule (clpeft's ``quarter_cosine``) and the
    split sizes; from ``experiments/<dataset>.sh``: ``--prompt_param M L_p mu``; from
    ``models/zoo.py``: layers ``[0..4]`` and timm 0.4.12's ``vit_base_patch16_224`` weights (its
    ``requirements.txt`` pins that timm), which are augreg's IN-21k pretrained, IN-1k fine-tuned
    ViT-B/16: ``vit_base_patch16_224.augreg_in21k_ft_in1k`` in today's timm; from
    ``dataloaders/utils.py``: the training crop and flip, unnormalised [0, 1] inputs and ImageNet-R's test crop;
    from its trainer: ``drop_last``; and float32 (no autocast). The script's single
    repeat has seed 0, which keeps the classes in their natural order. Mutation checked: lr 0.002
    in the YAML fails it.
    """
    official = yaml.safe_load((ref.root / "configs" / config).read_text())
    pool_size, length, mu = _official_coda_args(ref.root, script)
    cfg = clpeft.config.load(CONFIGS / ours)
    train, strategy, scenario, backbone = cfg.train, cfg.strategy.params, cfg.scenario.params, cfg.backbone.params
    assert train.epochs == official["schedule"][-1]
    assert (train.batch_size, train.lr) == (official["batch_size"], official["lr"])
    assert (train.optimizer, train.weight_decay, official["optimizer"]) == ("adam", official["weight_decay"], "Adam")
    assert official["schedule_type"] == "cosine" and train.schedule == "quarter_cosine"
    assert train.amp == "off"  # the official runs train in float32
    assert train.augment == "crop_flip_coda"  # its train transform (tests/reference/test_augment.py)
    assert train.drop_last  # its trainer: DataLoader(..., shuffle=True, drop_last=True)
    assert (backbone["mean"], backbone["std"]) == ([0, 0, 0], [1, 1, 1])  # dataloaders/utils.py: mean 0, std 1
    if n_classes == 200:  # ImageNet-R: Resize(256) + CenterCrop(224) at test time
        assert backbone["crop_pct"] == 0.875 and scenario["dataset_options"]["image_size"] == 256
    param = torch.nn.Parameter(torch.zeros(1))
    assert make_optimizer([{"params": [param]}], train).defaults["betas"] == (official["momentum"], 0.999)
    assert official["first_split_size"] == official["other_split_size"] == n_classes // scenario["n_experiences"]
    assert scenario.get("class_order") is None
    assert strategy["components_per_task"] * scenario["n_experiences"] == pool_size
    assert (strategy["prompt_length"], strategy["ortho_weight"]) == (length, mu)
    assert strategy["layers"] == _reference_prompt(ref).e_layers
    assert backbone["model"] == "vit_base_patch16_224.augreg_in21k_ft_in1k" and backbone["pretrained"]
    assert timm.models.get_pretrained_cfg(backbone["model"]).url == (
        "https://storage.googleapis.com/vit_models/augreg/B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0"
        "--imagenet2012-steps_20k-lr_0.01-res_224.npz"
    )  # timm 0.4.12's vit_base_patch16_224 url
