"""LUCIR and X-DER against Mammoth's ``models/lucir.py``, ``models/xder.py`` and ``utils/buffer.py``.

Both sides start from the same tiny MLP (6 inputs, 8 hidden units, 4 classes in two experiences of
two; Mammoth's network is a copy of clpeft's backbone and head, and clpeft's head is grown to all 4
classes first, as Mammoth's network has every class's output) and see the same batches. Mammoth's
methods run on namespaces holding what they read, so no Mammoth dataset or training loop is
involved; the random draws are made to coincide: Mammoth's buffer draws with numpy and here gets a
numpy whose draws come from torch's global generator, drawn as clpeft draws, and both sides start
from the same seed.

* **LUCIR**: the loss of every step of both experiences (``observe``/``get_loss``: cross-entropy
  of the scaled cosines, less-forget distillation, margin ranking), the imprinted rows
  (``imprint_weights``), and every parameter after each experience's class-balanced finetuning
  (``end_task``/``fit_buffer``). Mammoth's ``fill_buffer`` is handed clpeft's exemplars (Mammoth
  herds un-normalised features, clpeft the official code's normalised ones), and its ``lambda``
  is set to clpeft's before the second experience: the test shows that Mammoth's own is 0 there.
* **X-DER**: the loss of every step, the memory slot by slot (inputs, labels, logits, after both
  experiences: the rewritten logits included) and every parameter; the SupCon consistency term runs
  with weight 0 and the future constraint off (left out in clpeft, see ``strategies/x_der.py``).

Tolerances: float32 on both sides, same operations: ``atol=1e-5``. Mutations checked to fail here:
LUCIR's margin ranking on the scaled logits, the old rows left trainable, a ``lambda`` other than
``lambda_base sqrt(old / new)``, imprinting without the old rows' norm; X-DER's present-head cross-entropy over all
seen classes, the rewrite of replayed logits without the ``1 / n`` draw, ``gamma`` dropped.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib
import inspect
import sys
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from clpeft.components.memory.extended_logits import update_logits
from clpeft.components.regularization.margin_ranking import margin_ranking_loss
from clpeft.data import Batch
from clpeft.strategies.lucir import LUCIR
from clpeft.strategies.x_der import XDER

from .conftest import load_reference, ref_dir, stub_module
from .test_classic_cil import BATCH, LR, N_CLASSES, _copy_net, _strategy, _stream
from .test_mammoth_replay import _TorchDrawnNumpy

SEED = 5
TOLERANCE = {"atol": 1e-5, "rtol": 0.0}


def _seeded_loader(args, dataset, batch_size, shuffle=False, **kwargs):
    """Mammoth's ``create_seeded_dataloader``: batches in the order of one ``torch.randperm`` (when shuffled)."""
    order = torch.randperm(len(dataset)) if shuffle else torch.arange(len(dataset))
    return [dataset[chunk] for chunk in order.split(batch_size)]


@contextlib.contextmanager
def _mammoth(model: str):
    """Mammoth's ``models.<model>`` and ``utils.buffer`` (numpy draws from torch's global generator)."""
    root = ref_dir("mammoth")
    stubs = {
        "datasets": stub_module("datasets", get_dataset=None),
        "utils": stub_module("utils", __path__=[str(root / "utils")], binary_to_boolean_type=lambda v: str(v).lower() in ("1", "true")),
        "utils.args": stub_module("utils.args", ArgumentParser=argparse.ArgumentParser, add_rehearsal_args=lambda parser: None),
        "utils.conf": stub_module("utils.conf", get_device=lambda: torch.device("cpu"), create_seeded_dataloader=_seeded_loader),
        "utils.augmentations": stub_module("utils.augmentations", apply_transform=lambda x, transform=None: transform(x), strong_aug=None),
        "utils.batch_norm": stub_module("utils.batch_norm", bn_track_stats=lambda model, on: contextlib.nullcontext()),
        "utils.spkdloss": stub_module("utils.spkdloss", SPKDLoss=None),
        "utils.simclrloss": stub_module("utils.simclrloss", SupConLoss=None),
        "models.utils": stub_module("models.utils", __path__=[str(root / "models" / "utils")]),
        "models.utils.continual_model": stub_module("models.utils.continual_model", ContinualModel=nn.Module),
    }
    with load_reference("mammoth", f"models.{model}", stubs=stubs) as module:
        buffer_module = importlib.import_module("utils.buffer")
        buffer_module.np = _TorchDrawnNumpy(None)
        yield module, buffer_module


@contextlib.contextmanager
def _whole_buffer_reads(buffer_module):
    """``get_data(buffer_size)`` reads the whole buffer (its order is never used): no draw."""
    drawn = buffer_module.np.random
    buffer_module.np.random = types.SimpleNamespace(choice=lambda n, size, replace: np.arange(n)[:size], randint=drawn.randint)
    try:
        yield
    finally:
        buffer_module.np.random = drawn


def _clpeft_step(strategy, optimizer, positions, x, y) -> float:
    loss = strategy.training_step(Batch(x, y, index=positions))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    strategy.after_backward()
    optimizer.step()
    strategy.after_training_step()
    return loss.item()


def _view_batches(view):
    for positions in torch.arange(len(view)).split(BATCH):
        x, y = view.load(positions)
        yield positions, x, y


# --------------------------------------------------------------------------------------------
# LUCIR
# --------------------------------------------------------------------------------------------


def test_margin_ranking_loss_equals_mammoth():
    torch.manual_seed(0)
    cosines = torch.rand(10, 6) * 2 - 1
    with _mammoth("lucir") as (ref, _):
        for labels in (torch.tensor([0, 4, 1, 5, 2, 3, 0, 4, 1, 2]), torch.tensor([3, 4, 5, 3, 4, 5, 3, 4, 5, 3])):
            theirs = ref.lucir_batch_hard_triplet_loss(labels, cosines, 2, 0.5, 3)
            torch.testing.assert_close(margin_ranking_loss(cosines, labels, 3, 2, 0.5), theirs.reshape(()), **TOLERANCE)
    assert margin_ranking_loss(cosines, torch.tensor([0] * 10), 3, 2, 0.5) > 0


class _MammothNet(nn.Module):
    """Mammoth's backbone interface: ``returnt='features'`` and a ``classifier``."""

    def __init__(self, body: nn.Module, classifier: nn.Module):
        super().__init__()
        self.body, self.classifier = body, classifier

    def forward(self, x, returnt="out"):
        features = self.body(x)
        return features if returnt == "features" else self.classifier(features)


class _Data(torch.utils.data.Dataset):
    """What ``imprint_weights`` reads of a training set: ``data``, numpy ``targets``, items."""

    def __init__(self, x, y):
        self.data, self.targets = x, y.numpy()

    def __len__(self):
        return len(self.data)

    def __getitem__(self, i):
        return self.data[i], torch.as_tensor(self.targets)[i]


def _assert_same_lucir(strategy, net: _MammothNet) -> None:
    for a, b in zip(strategy.backbone.net.parameters(), net.body.parameters()):
        torch.testing.assert_close(a.detach(), b.detach(), **TOLERANCE)
    torch.testing.assert_close(strategy.head.weight.detach(), torch.cat(list(net.classifier.weights)).detach(), **TOLERANCE)
    torch.testing.assert_close(strategy.head.scale.detach().reshape(1), net.classifier.sigma.detach(), **TOLERANCE)


def test_lucir_equals_mammoth(monkeypatch):
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: None)  # fit_buffer synchronises
    stream = _stream()
    options = {"mem_size": 6, "lambda_base": 5.0, "lambda_mr": 1.5, "k": 2, "margin": 0.5, "finetune_epochs": 3, "finetune_lr": 0.05}
    strategy = _strategy(LUCIR, **options)
    strategy.head.grow_to(N_CLASSES)
    with _mammoth("lucir") as (ref, buffer_module):
        classifier = ref.CustomClassifier(8, 2, 2)
        for t, block in enumerate(classifier.weights):
            block.data.copy_(strategy.head.weight.data[2 * t : 2 * t + 2])
        net = _MammothNet(copy.deepcopy(strategy.backbone.net), classifier)
        args = types.SimpleNamespace(
            k_mr=options["k"],
            mr_margin=options["margin"],
            lamda_mr=options["lambda_mr"],
            lamda_base=options["lambda_base"],
            fitting_epochs=options["finetune_epochs"],
            lr_finetune=options["finetune_lr"],
            optim_mom=0.0,
            optim_wd=0.0,
            batch_size=BATCH,
            dataset="toy",
        )
        observer = types.SimpleNamespace(
            net=net,
            old_net=None,
            args=args,
            dataset=types.SimpleNamespace(N_CLASSES_PER_TASK=2, N_TASKS=2),
            lamda_cos_sim=options["lambda_base"],
            ft_lr_strat=[10],
            transform=None,
            device=torch.device("cpu"),
            buffer=buffer_module.Buffer(options["mem_size"]),
        )
        for name in ("observe", "get_loss", "fit_buffer", "update_classifier", "imprint_weights"):
            setattr(observer, name, getattr(ref.Lucir, name).__get__(observer))
        observer.register_buffer = lambda name, value: setattr(observer, name, value)

        for exp in stream:
            observer.current_task = exp.index
            strategy.before_experience(exp)
            if exp.index:
                observer.update_classifier()
                observer.imprint_weights(types.SimpleNamespace(train_loader=types.SimpleNamespace(dataset=_Data(*exp.train.load()))))
                torch.testing.assert_close(strategy.head.weight[2:].detach(), classifier.weights[1].detach(), **TOLERANCE)
                assert observer.lamda_cos_sim == 0.0 and strategy.less_forget == 5.0  # Mammoth's off-by-one task index
                observer.lamda_cos_sim = strategy.less_forget
            trained = [*net.body.parameters(), classifier.weights[exp.index], classifier.sigma]
            observer.opt = torch.optim.SGD(trained, lr=LR)
            optimizer = torch.optim.SGD([p for p in strategy.parameters() if p.requires_grad], lr=LR)
            for positions, x, y in _view_batches(strategy.train_data(exp)):
                mine = _clpeft_step(strategy, optimizer, positions, x, y)
                assert mine == pytest.approx(observer.observe(x, y, x), abs=1e-5)
            _assert_same_lucir(strategy, net)

            torch.manual_seed(SEED)
            strategy.after_experience(exp)
            memory_x, memory_y = strategy.rehearsal.memory.view(stream[: exp.index + 1]).load()

            def exemplars(buffer, *args, **kwargs):
                buffer.empty()
                buffer.add_data(examples=memory_x, labels=memory_y)

            monkeypatch.setattr(ref, "fill_buffer", exemplars)
            torch.manual_seed(SEED)
            ref.Lucir.end_task(observer, None)
            _assert_same_lucir(strategy, net)
            assert observer.lamda_cos_sim == options["lambda_base"] * exp.index**0.5
    assert sorted(memory_y.tolist()) == [0, 1, 2, 3]  # 6 // 4 exemplars per class


def test_lucir_defaults_are_mammoths():
    with _mammoth("lucir") as (ref, _):
        theirs = ref.Lucir.get_parser(argparse.ArgumentParser()).parse_args([])
    mine = {name: p.default for name, p in inspect.signature(LUCIR).parameters.items()}
    assert (mine["lambda_base"], mine["lambda_mr"], mine["k"], mine["margin"]) == (
        theirs.lamda_base,
        theirs.lamda_mr,
        theirs.k_mr,
        theirs.mr_margin,
    )
    assert (mine["finetune_epochs"], mine["finetune_lr"], mine["imprint"]) == (
        theirs.fitting_epochs,
        theirs.lr_finetune,
        bool(theirs.imprint_weights),
    )


# --------------------------------------------------------------------------------------------
# X-DER
# --------------------------------------------------------------------------------------------


def test_update_logits_equals_mammoth():
    torch.manual_seed(0)
    old, new, labels = torch.randn(7, 6), torch.randn(7, 6) * 3, torch.tensor([0, 1, 0, 1, 0, 1, 1])
    with _mammoth("xder") as (ref, _):
        observer = types.SimpleNamespace(cpt=2, args=types.SimpleNamespace(gamma=0.85))
        theirs = ref.XDer.update_logits(observer, old.clone(), new.clone(), labels, 1, 2)
    mine = update_logits(old, new, labels, 2, 6, 0.85)
    torch.testing.assert_close(mine, theirs, **TOLERANCE)
    assert not torch.equal(mine[:, 2:], new[:, 2:])  # some rows were scaled


class _Loader:
    """Mammoth's training loader: ``(inputs, labels, not_aug_inputs)`` in the order of one ``torch.randperm``."""

    def __init__(self, view):
        self.x, self.y = view.load()

    def __iter__(self):
        for chunk in torch.randperm(len(self.y)).split(BATCH):
            yield self.x[chunk], self.y[chunk], self.x[chunk]


def test_x_der_equals_mammoth():
    stream = _stream()
    options = {"mem_size": 11, "minibatch_size": 5, "alpha": 0.4, "beta": 0.7, "gamma": 0.85}
    strategy = _strategy(XDER, **options)
    strategy.head.grow_to(N_CLASSES)
    net = _copy_net(strategy)
    with _mammoth("xder") as (ref, buffer_module):
        args = types.SimpleNamespace(
            **{k: options[k] for k in ("minibatch_size", "alpha", "beta", "gamma")},
            batch_size=BATCH,
            buffer_size=options["mem_size"],
            simclr_batch_size=4,
            simclr_num_aug=2,
            lambd=0.0,
            align_bn=False,
            future_constraint=False,
            past_constraint=False,
            dp_weight=0.0,
        )
        observer = types.SimpleNamespace(
            net=net,
            opt=torch.optim.SGD(net.parameters(), lr=LR),
            loss=F.cross_entropy,
            buffer=buffer_module.Buffer(options["mem_size"]),
            update_counter=torch.zeros(options["mem_size"]),
            args=args,
            transform=None,
            device=torch.device("cpu"),
            cpt=2,
            n_tasks=2,
            training=True,
            train=lambda mode=True: None,
            gpu_augmentation=lambda x: x,
            simclr_lss=lambda features, labels: torch.tensor(0.0),
        )
        observer.update_logits = ref.XDer.update_logits.__get__(observer)
        theirs = []
        torch.manual_seed(SEED)
        for exp in stream:
            observer.current_task, observer.n_past_classes, observer.n_seen_classes = exp.index, 2 * exp.index, 2 * exp.index + 2
            for _, x, y in _view_batches(exp.train):
                theirs.append(ref.XDer.observe(observer, x, y, x))
            with _whole_buffer_reads(buffer_module):
                ref.XDer.end_task(observer, types.SimpleNamespace(train_loader=_Loader(exp.train)))
        buffer = observer.buffer

    torch.manual_seed(SEED)
    mine, replays = [], 0.0
    for exp in stream:
        strategy.before_experience(exp)
        optimizer = torch.optim.SGD(strategy.parameters(), lr=LR)
        mine += [_clpeft_step(strategy, optimizer, *batch) for batch in _view_batches(exp.train)]
        replays = max(replays, float(strategy.memory.replays.max()))
        strategy.after_experience(exp)

    np.testing.assert_allclose(mine, theirs, **TOLERANCE)
    memory = strategy.memory
    slots = torch.arange(len(memory))
    assert len(memory) == options["mem_size"] == len(buffer)
    torch.testing.assert_close(memory.buffer.at(slots, stream).load()[0], buffer.examples, rtol=0, atol=0)
    assert memory.labels.tolist() == buffer.labels.tolist() and sorted(memory.labels.tolist().count(c) for c in (2, 3)) == [
        3,
        4,
    ]  # 2 + 2 + (3 + 4 in some order)
    torch.testing.assert_close(memory.read(slots, N_CLASSES), buffer.logits, **TOLERANCE)
    for a, b in zip([*strategy.backbone.net.parameters(), *strategy.head.parameters()], net.parameters()):
        torch.testing.assert_close(a.detach(), b.detach(), **TOLERANCE)
    assert replays > 1  # some replayed slots faced the 1 / n draw


def test_x_der_gamma_default_is_mammoths():
    with _mammoth("xder") as (ref, _):
        parser = ref.XDer.get_parser(argparse.ArgumentParser())
        theirs = parser.parse_args(["--alpha", "1", "--beta", "1"])
    assert inspect.signature(XDER).parameters["gamma"].default == theirs.gamma
    assert sys.modules.get("utils.buffer") is None
