"""L2P against its official PyTorch port (``shared/refs/l2p-pytorch``, JH-LEE-KR/l2p-pytorch).

Both sides run timm's ``test_vit`` (6 blocks, width 64, 2 heads) at 48 px with the same random
weights: clpeft through :class:`~clpeft.backbones.timm_backbone.TimmBackbone` and the L2P
strategy built from ``configs/l2p/cifar100_10t.yaml``'s strategy section; the port through its
own ``VisionTransformer``/``Prompt`` built as its ``main.py`` builds them from its
``configs/cifar100_l2p.py`` defaults, with the timm weights copied in through its pretrained
loader's position-embedding expansion. Inputs are seeded [0, 1] images.

Equal: prompt selection (per sample and batch-wise), the pull constraint, the prompted
features and logits, every training step's loss (up to the constant ``lambda * N``, below),
the parameters after two tasks of the port's own ``train_and_evaluate`` with its optimizer,
the evaluation logits, and the published config's settings and transforms.

Deliberate differences, shown here:

* the pull constraint: the port subtracts ``lambda * sum cos / B``, clpeft adds
  ``lambda * sum (1 - cos) / B`` (eq. 5's ``gamma = 1 - cos``): clpeft's loss is higher by
  exactly ``lambda * N``; gradients and parameters are the same;
* batch-wise majority ties: the port's ``torch.topk`` over the vote counts leaves ties in an
  order torch does not specify (CPU and CUDA differ); clpeft breaks them towards the smaller
  prompt index. Where the vote has no tie at the ``N``-th place both choose the same prompts;
  the two-task run pins the port's ties to clpeft's rule (a stable ``topk``) to compare steps.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import clpeft.config
from clpeft.augment import RECIPES
from clpeft.backbones.timm_backbone import TimmBackbone
from clpeft.strategies.l2p import L2P

from .conftest import load_reference as _load_reference
from .conftest import ref_dir
from .jh_lee_ports import (
    capture_logits,
    freeze_as_official,
    official_accuracies,
    official_args,
    official_losses,
    official_model,
    port_stubs,
    scale_lr,
    task_stream,
    train_clpeft,
)

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "l2p" / "cifar100_10t.yaml"
IMG, CLASSES_PER_TASK = 48, 3


@pytest.fixture
def port(load_reference, monkeypatch):
    """The port's modules and its parsed CIFAR-100 config (``nb_classes`` for two tasks of three classes).

    Its prompt.py gets a ``topk`` that breaks batch-wise vote ties as clpeft does (see the module docstring);
    :func:`test_prompt_selection_and_pull_constraint_equal` checks the unpinned port where it has no ties.
    """
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)  # train_one_epoch's, on a CPU
    with load_reference("l2p-pytorch", "vision_transformer", stubs=port_stubs()) as vision_transformer:
        importlib.import_module("prompt").torch = _stable_topk_torch()
        engine = importlib.import_module("engine")
        args = official_args("cifar100_l2p", nb_classes=2 * CLASSES_PER_TASK, num_tasks=2, epochs=1, distributed=False, output_dir="")
        yield types.SimpleNamespace(vt=vision_transformer, engine=engine, args=args)


def _config():
    return clpeft.config.load(CONFIG)


def _clpeft_l2p(seed: int = 0) -> L2P:
    """The published config's L2P and input scaling on the tiny random ViT."""
    cfg = _config()
    scaling = {k: cfg.backbone.params[k] for k in ("mean", "std", "crop_pct")}
    torch.manual_seed(seed)
    backbone = TimmBackbone((3, IMG, IMG), model="test_vit", img_size=IMG, freeze=True, **scaling)
    return L2P(backbone, **cfg.strategy.params)


def _official_pair(port, strategy: L2P):
    """The port's ``original_model`` and prompted ``model`` with clpeft's backbone, prompts, keys and head."""
    net = strategy.backbone.net
    original = official_model(port.vt, net, port.args, prompted=False)
    model = official_model(port.vt, net, port.args, prompted=True)
    with torch.no_grad():
        model.prompt.prompt.copy_(strategy.prompt_pool.prompts)
        model.prompt.prompt_key.copy_(strategy.prompt_pool.keys)
        strategy.head.grow_to(port.args.nb_classes)  # the port's head has every class from the start
        model.head.weight.copy_(strategy.head.weight)
        model.head.bias.copy_(strategy.head.bias)
    freeze_as_official(model, original, port.args)
    return original.eval(), model


def _images(n: int, seed: int) -> torch.Tensor:
    return torch.rand(n, 3, IMG, IMG, generator=torch.Generator().manual_seed(seed))


def _stable_topk_torch() -> types.ModuleType:
    """``torch`` for the port's prompt.py, whose ``topk`` breaks ties towards the lower index (clpeft's rule)."""

    def topk(input, k, dim=-1, largest=True, sorted=True):
        order = torch.sort(input, dim=dim, descending=largest, stable=True).indices.narrow(dim, 0, k)
        return torch.gather(input, dim, order), order

    proxy = types.ModuleType("torch")
    proxy.__getattr__ = lambda name: getattr(torch, name)
    proxy.topk = topk
    return proxy


def test_published_config_is_the_ports_cifar100_setup(port):
    """configs/l2p/cifar100_10t.yaml against configs/cifar100_l2p.py, main.py's lr scaling and the loaders of datasets.py.

    Mutations checked: eval.batch_size 256 (the value before this test) and mean/std left at the weights' fail here.
    """
    cfg, args = _config(), official_args("cifar100_l2p")
    s, t = cfg.strategy.params, cfg.train
    assert (s["pool_size"], s["prompt_length"], s["top_k"]) == (args.size, args.length, args.top_k)
    assert s["matching_weight"] == args.pull_constraint_coeff and args.pull_constraint
    assert s["batchwise_selection"] == args.batchwise_prompt and s["prompt_position"] == "cls"
    assert s.get("train_mask", True) == args.train_mask and not args.use_prompt_mask and not args.shared_prompt_pool
    assert (args.embedding_key, args.head_type, args.prompt_key, args.prompt_key_init) == ("cls", "prompt", True, "uniform")
    assert (t.optimizer, t.epochs, t.batch_size, t.weight_decay, t.clip_grad) == (
        args.opt,
        args.epochs,
        args.batch_size,
        args.weight_decay,
        args.clip_grad,
    )
    assert tuple(args.opt_betas) == (0.9, 0.999) and args.opt_eps == 1e-8 and args.sched == "constant"
    assert t.lr == pytest.approx(scale_lr(official_args("cifar100_l2p")).lr, rel=1e-12)
    assert t.schedule == "constant" and t.amp == "off" and t.augment == "crop_flip"
    assert cfg.scenario.params.get("class_order") is None and not args.shuffle  # natural class order
    assert (cfg.backbone.params["mean"], cfg.backbone.params["std"]) == ([0, 0, 0], [1, 1, 1])
    assert cfg.backbone.params["crop_pct"] == 224 / 256  # datasets.build_transform: Resize(256) + CenterCrop(224)
    assert cfg.backbone.params["model"] == "vit_base_patch16_224.orig_in21k"  # the port's imagenet21k/ViT-B_16.npz
    assert "imagenet21k/ViT-B_16.npz" in port.vt.default_cfgs[args.model]["url"]
    # the evaluation batch: datasets.py builds every test loader with --batch-size
    with _ported_datasets() as datasets:
        loaders, _ = datasets.build_continual_dataloader(official_args("cifar100_l2p", distributed=False, num_workers=0))
    assert {loader["val"].batch_size for loader in loaders} == {cfg.eval.batch_size} == {args.batch_size}


def test_imagenet_r_config_is_pilots_l2p_setup():
    """configs/l2p/imagenet_r_10t.yaml against LAMDA-PILOT's exps/l2p_inr.json (the port has no ImageNet-R config).

    Mutation checked: clip_grad 1.0 (the value before this test; PILOT does not clip) fails here.
    """
    pilot = ref_dir("pilot")
    exp = json.loads((pilot / "exps" / "l2p_inr.json").read_text())
    cfg = clpeft.config.load(CONFIG.with_name("imagenet_r_10t.yaml"))
    s, t = cfg.strategy.params, cfg.train
    assert (s["pool_size"], s["prompt_length"], s["top_k"], s["matching_weight"], s["batchwise_selection"]) == (
        exp["size"],
        exp["length"],
        exp["top_k"],
        exp["pull_constraint_coeff"],
        exp["batchwise_prompt"],
    )
    assert (t.epochs, t.batch_size, t.lr, t.optimizer, t.weight_decay, t.clip_grad) == (
        exp["tuned_epoch"],
        exp["batch_size"],
        exp["init_lr"],
        exp["optimizer"],
        exp["weight_decay"],
        None,
    )
    assert cfg.eval.batch_size == exp["batch_size"]  # PILOT's test loader
    assert cfg.scenario.params["class_order"] == exp["seed"][0] and exp["shuffle"]
    assert cfg.backbone.params["model"] == "vit_base_patch16_224.augreg_in21k_ft_in1k"
    assert "augreg" in (pilot / "backbone" / "vit_l2p.py").read_text().split("'vit_base_patch16_224': _cfg(")[1][:200]


class _Images(torch.utils.data.Dataset):
    """Stands in for torchvision's CIFAR-100 in the port's loaders: ten classes of four images."""

    classes = list(range(10))
    targets = [i % 10 for i in range(40)]

    def __len__(self):
        return 40

    def __getitem__(self, i):
        return torch.zeros(3, 8, 8), self.targets[i]


@contextlib.contextmanager
def _ported_datasets():
    """The port's datasets.py, its get_dataset answering with :class:`_Images`."""
    with _load_reference("l2p-pytorch", "datasets", stubs=port_stubs()) as datasets:
        datasets.get_dataset = lambda name, train_tf, val_tf, args: (_Images(), _Images())
        yield datasets


def test_transforms_are_the_ports(load_reference):
    """clpeft's [0, 1] input with crop_pct 0.875 against datasets.build_transform; crop_flip against its training transform.

    The port's test transform is PIL Resize(256, bicubic) + CenterCrop(224) + ToTensor (no normalisation); clpeft's
    preprocessing does the same on tensors. Tolerance: mean |difference| < 0.01 and max < 0.1 of the [0, 1] range
    (PIL's bicubic kernel a = -0.5, torch's a = -0.75). Mutations checked: mean/std left at the weights' (0.5, 0.5)
    (difference ~0.5) and crop_pct unset (a bilinear 32 -> 224 resize, no crop: mean difference 0.135) both fail.
    """
    cfg = _config()
    scaling = {k: cfg.backbone.params[k] for k in ("mean", "std", "crop_pct")}
    backbone = TimmBackbone((3, 32, 32), model="test_vit", img_size=224, **scaling)
    with load_reference("l2p-pytorch", "datasets", stubs=port_stubs()) as datasets:
        args = official_args("cifar100_l2p")
        test_tf, train_tf = datasets.build_transform(False, args), datasets.build_transform(True, args)
    rng = np.random.default_rng(0)
    smooth = np.kron(rng.integers(0, 256, (3, 8, 8)), np.ones((1, 4, 4))).astype(np.uint8)  # CIFAR-like 32 px
    image = np.clip(smooth + rng.integers(-20, 21, smooth.shape), 0, 255).astype(np.uint8)
    official = test_tf(Image.fromarray(image.transpose(1, 2, 0)))
    ours = backbone.preprocess(torch.from_numpy(image).unsqueeze(0))[0]
    assert official.shape == ours.shape == (3, 224, 224)
    difference = (official - ours).abs()
    assert difference.mean() < 0.01 and difference.max() < 0.1
    crop, flip = train_tf.transforms[:2]
    recipe = {step["name"]: step for step in RECIPES[cfg.train.augment]}
    assert (tuple(recipe["RandomResizedCrop"]["scale"]), tuple(recipe["RandomResizedCrop"]["ratio"])) == (crop.scale, crop.ratio)
    assert recipe["RandomHorizontalFlip"]["p"] == flip.p and type(train_tf.transforms[2]).__name__ == "ToTensor"


@pytest.mark.parametrize("batchwise", [False, True])
def test_prompt_selection_and_pull_constraint_equal(load_reference, batchwise):
    """PromptPool against prompt.Prompt (embedding_key 'cls': the query is the frozen [CLS] feature) on 100 seeded batches.

    Per sample, the chosen prompts are equal in order. Batch-wise, they are equal as sets wherever the vote has no tie
    at the N-th place; at ties clpeft takes the smaller index (the port's order is torch.topk's, unspecified).
    clpeft's matching loss is N - reduce_sim (float32 tolerance 1e-5). Mutations checked: ties towards the larger index
    (stable sort on reversed ids) and the loss without the '1 -' both fail here.
    """
    M, L, N, D, B = 10, 5, 5, 16, 16
    ties = 0
    with load_reference("l2p-pytorch", "prompt") as ref:
        for seed in range(100):
            torch.manual_seed(seed)
            official = ref.Prompt(
                length=L,
                embed_dim=D,
                embedding_key="cls",
                prompt_init="uniform",
                prompt_pool=True,
                prompt_key=True,
                pool_size=M,
                top_k=N,
                batchwise_prompt=batchwise,
            )
            pool = _pool_like(official, batchwise)
            query = torch.randn(B, D)
            out = official(torch.randn(B, 3, D), cls_features=query)
            ours = pool(query)
            assert torch.equal(ours.prompts, pool.prompts[ours.indices].flatten(1, 2))
            if not batchwise:
                assert torch.equal(ours.indices, out["prompt_idx"])
                assert ours.matching_loss.item() == pytest.approx(N - out["reduce_sim"].item(), abs=1e-5)
                continue
            counts = (
                torch.bincount(torch.topk(query @ torch.nn.functional.normalize(pool.keys, dim=1).T, N).indices.flatten(), minlength=M)
                .sort(descending=True)
                .values
            )
            if counts[N - 1] == counts[N]:  # a tie at the N-th place: the port's choice is torch's
                ties += 1
                assert torch.equal(ours.indices[0], _smallest_among_ties(query, pool.keys, N))
            else:
                assert torch.equal(ours.indices.sort(1).values, out["prompt_idx"].sort(1).values)
                assert ours.matching_loss.item() == pytest.approx(N - out["reduce_sim"].item(), abs=1e-5)
            assert (ours.indices == ours.indices[:1]).all()
    assert not batchwise or 0 < ties < 100


def _pool_like(official, batchwise: bool):
    from clpeft.components.prompts.prompt_pool import PromptPool

    pool = PromptPool(official.pool_size, official.length, official.prompt.shape[-1], official.top_k, batchwise=batchwise)
    with torch.no_grad():
        pool.prompts.copy_(official.prompt)
        pool.keys.copy_(official.prompt_key)
    return pool


def _smallest_among_ties(query: torch.Tensor, keys: torch.Tensor, n: int) -> torch.Tensor:
    """The ``n`` most voted prompt ids, ties to the smaller id, most voted first (clpeft's documented rule)."""
    votes = torch.bincount(
        torch.topk(torch.nn.functional.normalize(query, dim=1) @ torch.nn.functional.normalize(keys, dim=1).T, n).indices.flatten(),
        minlength=keys.shape[0],
    )
    return torch.tensor(sorted(range(len(votes)), key=lambda i: (-int(votes[i]), i))[:n])


def test_prompted_features_and_logits_equal(port):
    """One forward of the published config's L2P (batch-wise, 16 images) against the port's model(x, cls_features=...).

    Same prompt indices, pre-logits (the prompt tokens' mean after the final norm) and logits; tolerance 1e-5
    (timm's fused attention against the port's explicit softmax). Mutations checked: prompt_position 'none' (the
    port adds [CLS]'s position embedding to the prompts) and pool 'default' instead of 'prompt_mean' both fail.
    """
    strategy = _clpeft_l2p()
    original, model = _official_pair(port, strategy)
    x = _images(16, seed=1)
    strategy.eval()
    model.eval()
    with torch.no_grad():
        query = strategy.backbone(x)
        official_query = original(x)["pre_logits"]
        out = model(x, cls_features=official_query)
        features, _ = strategy._features(x, query, train=False)
        indices = strategy.prompt_pool(query).indices
        logits = strategy.head(features)
    torch.testing.assert_close(query, official_query, atol=1e-5, rtol=0)
    assert torch.equal(indices.sort(1).values, out["prompt_idx"].sort(1).values)
    torch.testing.assert_close(features, out["pre_logits"], atol=1e-5, rtol=0)
    torch.testing.assert_close(logits, out["logits"], atol=1e-5, rtol=0)


def test_two_tasks_of_training_equal_the_ports_engine(port):
    """The port's train_and_evaluate (two tasks of three classes, two batches of 16 per task, its Adam, clipping and
    train_mask) against clpeft's hooks with the engine's optimizer and step, from the same weights.

    Every step's loss: clpeft's = the port's + lambda * N (1e-5). After both tasks: prompts, keys and head equal
    (atol 1e-6, the Adam steps being ~1e-3); the evaluation logits of both test sets (evaluated in batches of the
    published eval.batch_size) equal (1e-5), hence the accuracies. Batch-wise vote ties are pinned to clpeft's rule on
    the port's side (see the module docstring). Mutations checked, each failing here: the matching term halved in
    ``L2P.training_step``, ``ClassMask`` disabled, ``prompt_position`` 'none', pool 'default', the matching loss
    without its ``1 -`` (a constant: only the losses differ).
    """
    strategy = _clpeft_l2p()
    original, model = _official_pair(port, strategy)
    cfg, args = _config(), scale_lr(port.args)
    class_mask = [list(range(t * CLASSES_PER_TASK, (t + 1) * CLASSES_PER_TASK)) for t in range(2)]
    loaders = [_task_loaders(classes, args.batch_size, cfg.eval.batch_size, seed=10 + t) for t, classes in enumerate(class_mask)]
    logits = capture_logits(model)
    before = [t.detach().clone() for t in (model.prompt.prompt, model.prompt.prompt_key, model.head.weight)]
    optimizer = port.engine.create_optimizer(args, model)
    port.engine.train_and_evaluate(
        model, model, original, torch.nn.CrossEntropyLoss(), loaders, optimizer, None, torch.device("cpu"), class_mask, args
    )
    losses = train_clpeft(strategy, task_stream(class_mask), loaders, cfg.train, epochs=1)

    assert all((t - b).abs().max() > 1e-3 for t, b in zip((model.prompt.prompt, model.prompt.prompt_key, model.head.weight), before))
    lambda_n = strategy.matching_weight * strategy.prompt_pool.top_k
    np.testing.assert_allclose(losses, np.asarray(official_losses()) + lambda_n, atol=1e-5, rtol=0)
    torch.testing.assert_close(strategy.prompt_pool.prompts, model.prompt.prompt, atol=1e-6, rtol=0)
    torch.testing.assert_close(strategy.prompt_pool.keys, model.prompt.prompt_key, atol=1e-6, rtol=0)
    torch.testing.assert_close(strategy.head.weight, model.head.weight, atol=1e-6, rtol=0)
    # the port's last evaluate_till_now: task 0's then task 1's test batches
    final_eval = torch.cat(logits[-sum(len(loader["val"]) for loader in loaders) :])
    with torch.no_grad():
        ours = torch.cat([strategy.predict(x, strategy.backbone(x)) for loader in loaders for x, _ in loader["val"]])
    torch.testing.assert_close(ours, final_eval, atol=1e-5, rtol=0)
    labels = torch.cat([y for loader in loaders for _, y in loader["val"]])
    accuracies = official_accuracies()[-2:]
    sizes = [sum(len(y) for _, y in loader["val"]) for loader in loaders]
    ours_acc = (ours.argmax(1) == labels).float().split(sizes)
    assert [round(100 * float(a.mean()), 4) for a in ours_acc] == [round(a, 4) for _, a in accuracies]


def _task_loaders(classes: list[int], train_batch: int, eval_batch: int, seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    y = torch.tensor(classes).repeat_interleave(11)[torch.randperm(33, generator=g)]
    x = torch.rand(len(y), 3, IMG, IMG, generator=g)
    split = lambda t, n: list(t.split(n))  # noqa: E731
    return {
        "train": list(zip(split(x[:32], train_batch), split(y[:32], train_batch))),
        "val": list(zip(split(x[: eval_batch + 4], eval_batch), split(y[: eval_batch + 4], eval_batch))),
    }


def test_batchwise_selection_shares_a_test_batchs_task_evidence(port):
    """Why the published configs pin the evaluation batch: with batch-wise selection (the port's and clpeft's), an
    image's logits depend on the other images of its test batch, on both sides alike.

    Mutation checked: batchwise_selection false in the strategy makes the first assertion fail (per-sample
    selection: the image's logits do not depend on its batch mates).
    """
    strategy = _clpeft_l2p(seed=3)
    original, model = _official_pair(port, strategy)
    strategy.eval()
    x = _images(16, seed=4)
    with torch.no_grad():
        alone = strategy.predict(x[:1], strategy.backbone(x[:1]))
        in_batch = strategy.predict(x, strategy.backbone(x))[:1]
        official_alone = model(x[:1], cls_features=original(x[:1])["pre_logits"])["logits"]
        official_in_batch = model(x, cls_features=original(x)["pre_logits"])["logits"][:1]
    assert not torch.allclose(alone, in_batch, atol=1e-4)
    torch.testing.assert_close(alone, official_alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(in_batch, official_in_batch, atol=1e-5, rtol=0)


def test_prompt_and_key_initialisation_is_the_ports(load_reference):
    """prompt.Prompt and PromptPool draw prompts and keys alike: uniform on [-1, 1] (the port's prompt_init and
    prompt_key_init 'uniform'). Two-sample Kolmogorov-Smirnov test on 25,600 values each, fixed seeds, p > 0.01.

    Mutation checked: keys drawn from U(-0.5, 0.5) fails here.
    """
    from scipy.stats import ks_2samp

    from clpeft.components.prompts.prompt_pool import PromptPool

    torch.manual_seed(0)
    with load_reference("l2p-pytorch", "prompt") as ref:
        official = ref.Prompt(
            length=5,
            embed_dim=256,
            embedding_key="cls",
            prompt_init="uniform",
            prompt_pool=True,
            prompt_key=True,
            pool_size=20,
            top_k=5,
            prompt_key_init="uniform",
        )
    torch.manual_seed(1)
    ours = PromptPool(20, 5, 256, 5)
    for theirs, mine in ((official.prompt, ours.prompts), (official.prompt_key, ours.keys)):
        assert theirs.shape == mine.shape and mine.abs().max() <= 1
        assert ks_2samp(theirs.detach().flatten().numpy(), mine.detach().flatten().numpy()).pvalue > 0.01
