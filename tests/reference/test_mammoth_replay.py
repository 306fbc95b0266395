"""ER-ACE, DER++ (and DER), GDumb and A-GEM against Mammoth's ``models/`` and ``utils/buffer.py``.

Both sides start from the same tiny MLP (6 inputs, 8 hidden units, 4 classes; Mammoth's network is
a copy of clpeft's backbone and head), see the same batches of a two-experience stream, and make
the same random draws: Mammoth's buffer draws with numpy (``np.random.randint`` for the
reservoir, ``np.random.choice`` for a replayed batch), and these tests hand it a numpy whose two
draws come from a torch generator seeded as clpeft's global one, drawn the way
:class:`~clpeft.components.ReplayBuffer` draws (``torch.randint(n_seen)``, ``torch.randperm``). Mammoth's
``observe`` runs on a namespace holding what it reads (network, optimizer, loss, arguments,
buffer), so no Mammoth dataset or training loop is involved. Compared: the loss of every step,
the buffer's contents slot by slot (and DER's stored logits), and every parameter after the
last step. clpeft's head is grown to all 4 classes from the start, as Mammoth's network has every
class's output (with a growing head, DER compares only the stored logits:
``tests/components/test_logits_store.py``).

Tolerances: float32 on both sides; 1e-6 where both compute the same operations, 1e-4 for ER-ACE,
whose cosine classifier adds 1e-5 to the norms in Mammoth and not in clpeft. Mutations checked to
fail here: ER-ACE's mask without the classes above the largest label seen, or applied during the
first experience; DER++ drawing one replayed batch for both terms; A-GEM never projecting.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import inspect
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from torch import nn

from clpeft.backbones.mlp import MLPBackbone
from clpeft.data import ArrayDataset, Batch, DataView
from clpeft.data_access import DataAccess
from clpeft.experience import Experience
from clpeft.strategies.agem import AGEM
from clpeft.strategies.derpp import DERpp
from clpeft.strategies.er_ace import ERACE
from clpeft.strategies.gdumb import GDumb

from .conftest import load_reference, ref_dir, stub_module

N_CLASSES = 4
PER_CLASS = 12
BATCH = 8
MEMORY = 10  # smaller than an experience: the reservoir replaces slots
MINIBATCH = 5
LR = 0.1
SEED = 3
EPOCHS = 2
CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "baselines"


# --------------------------------------------------------------------------------------------
# the problem and both sides' networks
# --------------------------------------------------------------------------------------------


def _stream(classes=([0, 1], [2, 3])) -> list[Experience]:
    """Two experiences (of two classes each by default) over 6-dimensional inputs; every experience
    sees all 4 classes' outputs (Mammoth's fixed-size network)."""
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(N_CLASSES).repeat_interleave(PER_CLASS)
    inputs = torch.randn(len(labels), 6, generator=g) + labels[:, None].float()
    dataset = ArrayDataset(inputs, labels, "mammoth-toy")
    stream = []
    for k, present in enumerate(classes):
        idx = torch.nonzero(torch.isin(labels, torch.tensor(present))).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]  # positions in the view differ from dataset indices
        stream.append(Experience(k, DataView.of(dataset, idx), None, present, list(range(N_CLASSES))))
    for k, exp in enumerate(stream):
        exp.past = tuple(stream[:k])
    return stream


def _strategy(cls, **options):
    torch.manual_seed(0)
    strategy = cls(MLPBackbone(input_shape=(6,), hidden=[8], scale=1.0), **options)
    strategy.attach(DataAccess(torch.device("cpu"), None, strategy.backbone, batch_size=BATCH))
    return strategy


def _reference_net(strategy, head: nn.Module | None = None) -> nn.Sequential:
    """Mammoth's network: a copy of clpeft's backbone layers and head (``head`` given: its weights copied in)."""
    if head is None:
        head = nn.Linear(strategy.head.in_features, strategy.head.n_classes)
        head.weight.data.copy_(strategy.head.weight.data)
        head.bias.data.copy_(strategy.head.bias.data)
    return nn.Sequential(copy.deepcopy(strategy.backbone.net), head)


def _batches(exp: Experience, epochs: int = 1):
    """``epochs`` passes over the experience's batches in view order: ``(positions, inputs, labels)``."""
    for _ in range(epochs):
        for positions in torch.arange(len(exp.train)).split(BATCH):
            x, y = exp.train.load(positions)
            yield positions, x, y


class _TorchDrawnNumpy:
    """numpy for Mammoth's buffer, whose two draws come from ``generator`` as clpeft's buffer draws."""

    def __init__(self, generator: torch.Generator):
        self.random = types.SimpleNamespace(
            randint=lambda low, high: int(torch.randint(high, (1,), generator=generator)),
            choice=lambda n, size, replace: torch.randperm(n, generator=generator)[:size].numpy(),
        )

    def __getattr__(self, name):
        return getattr(np, name)


@contextlib.contextmanager
def _mammoth(model: str):
    """Mammoth's ``models.<model>`` and its ``utils.buffer`` (numpy's draws from a torch generator seeded with SEED)."""
    root = ref_dir("mammoth")
    stubs = {
        "utils": stub_module(
            "utils", __path__=[str(root / "utils")], smart_joint=None, binary_to_boolean_type=lambda v: str(v).lower() in ("1", "true")
        ),
        "utils.args": stub_module("utils.args", ArgumentParser=argparse.ArgumentParser, add_rehearsal_args=lambda parser: None),
        "utils.conf": stub_module(
            "utils.conf", get_device=lambda: torch.device("cpu"), warn_once=lambda *a: None, create_seeded_dataloader=None
        ),
        "utils.augmentations": stub_module("utils.augmentations", cutmix_data=None, apply_transform=lambda x, transform=None: transform(x)),
        "utils.status": stub_module("utils.status", progress_bar=lambda *a, **k: None),
        "models.utils": stub_module("models.utils", __path__=[str(root / "models" / "utils")]),
        "models.utils.continual_model": stub_module("models.utils.continual_model", ContinualModel=nn.Module),
        "backbone": stub_module("backbone", get_backbone=None),
    }
    with load_reference("mammoth", f"models.{model}", stubs=stubs) as module:
        buffer_module = sys.modules["utils.buffer"]
        buffer_module.np = _TorchDrawnNumpy(torch.Generator().manual_seed(SEED))
        yield module, buffer_module


def _observer(module_cls, net, buffer, current_task: int, **args):
    """What Mammoth's ``observe`` reads of ``self``."""
    return types.SimpleNamespace(
        net=net,
        opt=torch.optim.SGD(net.parameters(), lr=LR),
        loss=F.cross_entropy,
        buffer=buffer,
        transform=None,
        device=torch.device("cpu"),
        current_task=current_task,
        args=types.SimpleNamespace(minibatch_size=MINIBATCH, **args),
    )


def _stored_inputs(memory, stream) -> torch.Tensor:
    """The inputs clpeft's buffer holds, slot by slot."""
    return memory.at(torch.arange(len(memory)), stream).load()[0]


def _train_clpeft(strategy, stream, losses: list[float]) -> None:
    """The engine's step for every batch of every experience (SGD, no shuffling)."""
    for exp in stream:
        strategy.before_experience(exp)
        optimizer = torch.optim.SGD([p for p in strategy.parameters() if p.requires_grad], lr=LR)
        for positions, x, y in _batches(exp, EPOCHS):
            loss = strategy.training_step(Batch(x, y, index=positions))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            strategy.after_backward()
            optimizer.step()
            losses.append(loss.item())
        strategy.after_experience(exp)


def _assert_same_parameters(strategy, net: nn.Sequential, atol: float, rtol: float = 0.0) -> None:
    mine = [*strategy.backbone.net.parameters(), *strategy.head.parameters()]
    theirs = list(net.parameters())
    assert len(mine) == len(theirs)
    for a, b in zip(mine, theirs):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=rtol, atol=atol)


# --------------------------------------------------------------------------------------------
# ER-ACE
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("head", ["cosine", "linear"])
def test_er_ace_equals_mammoth(head):
    """The second experience holds an old class (masked out), a new one, and leaves class 3 to the
    future (above the largest label seen: not masked)."""
    stream = _stream(([0, 1], [1, 2]))
    strategy = _strategy(ERACE, mem_size=MEMORY, minibatch_size=MINIBATCH, head=head)
    strategy.head.grow_to(N_CLASSES)
    with _mammoth("er_ace") as (ref, buffer_module):
        custom = ref.CustomLinear(strategy.head.in_features, N_CLASSES, weight=strategy.head.weight.data.clone())
        net = _reference_net(strategy, custom if head == "cosine" else None)
        buffer = buffer_module.Buffer(MEMORY)
        theirs, seen = [], torch.tensor([]).long()
        for exp in stream:
            observer = _observer(ref, net, buffer, exp.index, task_free=False)
            observer.seen_so_far = seen
            for _, x, y in _batches(exp, EPOCHS):
                theirs.append(ref.ErACE.observe(observer, x, y, x))
            seen = observer.seen_so_far
    torch.manual_seed(SEED)
    mine: list[float] = []
    _train_clpeft(strategy, stream, mine)

    # Mammoth's cosine classifier divides by (norm + 1e-5), clpeft's by the norm
    tolerance = {"rtol": 1e-4, "atol": 1e-4} if head == "cosine" else {"rtol": 0, "atol": 1e-6}
    assert len(mine) == len(theirs) == EPOCHS * 2 * (2 * PER_CLASS // BATCH)
    np.testing.assert_allclose(mine, theirs, **tolerance)
    torch.testing.assert_close(_stored_inputs(strategy.memory, stream), buffer.examples, rtol=0, atol=0)
    assert strategy.memory.labels.tolist() == buffer.labels.tolist()
    _assert_same_parameters(strategy, net, **tolerance)
    assert int(strategy.largest_seen) == 2


def test_er_ace_defaults_are_mammoths():
    with _mammoth("er_ace") as (ref, _):
        defaults = ref.ErACE.get_parser(argparse.ArgumentParser()).parse_args([])
    options = inspect.signature(ERACE).parameters
    assert options["task_free"].default == defaults.task_free is False
    assert (options["head"].default == "cosine") == defaults.use_custom_classifier is True


# --------------------------------------------------------------------------------------------
# DER++ and DER
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("beta", [0.7, 0.0], ids=["derpp", "der (beta 0)"])
def test_derpp_equals_mammoth(beta):
    alpha = 0.4
    stream = _stream()
    strategy = _strategy(DERpp, mem_size=MEMORY, minibatch_size=MINIBATCH, alpha=alpha, beta=beta)
    strategy.head.grow_to(N_CLASSES)
    net = _reference_net(strategy)
    model = "derpp" if beta else "der"
    with _mammoth(model) as (ref, buffer_module):
        buffer = buffer_module.Buffer(MEMORY)
        observe = ref.Derpp.observe if beta else ref.Der.observe
        theirs = []
        for exp in stream:
            observer = _observer(ref, net, buffer, exp.index, alpha=alpha, beta=beta)
            for _, x, y in _batches(exp, EPOCHS):
                theirs.append(observe(observer, x, y, x))
    torch.manual_seed(SEED)
    mine: list[float] = []
    _train_clpeft(strategy, stream, mine)

    np.testing.assert_allclose(mine, theirs, rtol=0, atol=1e-6)
    torch.testing.assert_close(_stored_inputs(strategy.memory, stream), buffer.examples, rtol=0, atol=0)
    if beta:
        assert strategy.memory.labels.tolist() == buffer.labels.tolist()
    stored, mask = strategy.logits.read(torch.arange(MEMORY))
    assert mask.all()
    torch.testing.assert_close(stored, buffer.logits, rtol=0, atol=1e-6)
    _assert_same_parameters(strategy, net, atol=1e-6)
    # the replay terms mattered: without them the losses would differ from the second batch on
    assert max(abs(a - b) for a, b in zip(mine, _plain_cross_entropy_losses(stream))) > 1e-2


def _plain_cross_entropy_losses(stream) -> list[float]:
    strategy = _strategy(DERpp, mem_size=MEMORY, minibatch_size=MINIBATCH, alpha=0.0, beta=0.0)
    strategy.head.grow_to(N_CLASSES)
    losses: list[float] = []
    _train_clpeft(strategy, stream, losses)
    return losses


def test_derpp_defaults_are_mammoths_best_arguments():
    """Mammoth requires alpha and beta; its best arguments for Seq-CIFAR-10 with a 200-sample buffer
    (``utils/best_args.py``: lr 0.03, minibatch 32, alpha 0.1, beta 0.5) are clpeft's defaults."""
    options = inspect.signature(DERpp).parameters
    assert (options["mem_size"].default, options["minibatch_size"].default) == (200, 32)
    assert (options["alpha"].default, options["beta"].default) == (0.1, 0.5)
    # A-GEM and ER-ACE: the replayed batch of Mammoth's best arguments for Seq-CIFAR-10 (32)
    assert inspect.signature(AGEM).parameters["minibatch_size"].default == 32
    assert inspect.signature(ERACE).parameters["minibatch_size"].default == 32


# --------------------------------------------------------------------------------------------
# A-GEM
# --------------------------------------------------------------------------------------------


def test_agem_equals_mammoth_given_the_same_memory():
    """Mammoth's end_task offers its buffer only the first training batch of a task; here both
    memories are filled with the whole first experience (clpeft's update), then the second
    experience trains with gradient projection on both sides. The experiences share two classes,
    so that some steps' gradients agree with the memory's and are left alone."""
    stream = _stream(([0, 1, 2], [1, 2, 3]))
    strategy = _strategy(AGEM, mem_size=MEMORY, minibatch_size=MINIBATCH)
    strategy.head.grow_to(N_CLASSES)
    net = _reference_net(strategy)
    with _mammoth("agem") as (ref, buffer_module):
        buffer = buffer_module.Buffer(MEMORY)
        observer = _observer(ref, net, buffer, 0)
        observer.parameters = net.parameters
        observer.zero_grad = net.zero_grad
        observer.grad_dims = [p.numel() for p in net.parameters()]
        observer.grad_xy = torch.zeros(sum(observer.grad_dims))
        observer.grad_er = torch.zeros(sum(observer.grad_dims))
        theirs = []
        for exp in stream:
            for _, x, y in _batches(exp, EPOCHS):
                theirs.append(ref.AGem.observe(observer, x, y, x))
            x, y = exp.train.load()
            buffer.add_data(examples=x, labels=y)  # the whole experience, in view order
    projected = []
    original = AGEM.after_backward

    def counting(self):
        before = torch.cat([p.grad.flatten() for p in self.parameters()])
        original(self)
        projected.append(not torch.equal(before, torch.cat([p.grad.flatten() for p in self.parameters()])))

    torch.manual_seed(SEED)
    mine: list[float] = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(AGEM, "after_backward", counting)
        _train_clpeft(strategy, stream, mine)

    np.testing.assert_allclose(mine, theirs, rtol=0, atol=1e-6)
    torch.testing.assert_close(_stored_inputs(strategy.memory, stream), buffer.examples, rtol=0, atol=0)
    _assert_same_parameters(strategy, net, atol=1e-6)
    # the test saw both branches: steps whose gradient was projected and steps left alone
    second = projected[len(projected) // 2 :]
    assert any(second) and not all(second)


# --------------------------------------------------------------------------------------------
# GDumb
# --------------------------------------------------------------------------------------------


def test_gdumb_memory_and_fit_equal_mammoth(monkeypatch):
    """``policy: reservoir`` keeps Mammoth's memory slot by slot (Mammoth's buffer is handed the
    reservoir draws clpeft made, since clpeft's fresh head draws from the same generator between
    experiences); training on it from the reset weights equals Mammoth's ``fit_buffer`` (its
    first epoch, at ``maxlr / 10``, without CutMix)."""
    stream = _stream()
    strategy = _strategy(GDumb, mem_size=MEMORY, policy="reservoir")
    draws: list[tuple[int, int]] = []
    randint = torch.randint

    def recorded(high, size, generator=None):
        value = randint(high, size, generator=generator)
        draws.append((high, int(value)))
        return value

    torch.manual_seed(SEED)
    with monkeypatch.context() as mp:
        mp.setattr(torch, "randint", recorded)
        for exp in stream:
            strategy.before_experience(exp)
    assert strategy.head.n_classes == N_CLASSES
    net = _reference_net(strategy)
    maxlr, momentum, batch = 0.2, 0.9, 4
    with _mammoth("gdumb") as (ref, buffer_module):
        replayed = iter(draws)

        def replay_draw(low, high):
            expected_high, value = next(replayed)
            assert (low, high) == (0, expected_high)  # both count the samples offered alike
            return value

        buffer_module.np.random.randint = replay_draw
        buffer = buffer_module.Buffer(MEMORY)
        for exp in stream:
            for _, x, y in _batches(exp):
                ref.GDumb.observe(types.SimpleNamespace(buffer=buffer), x, y, x)
        assert next(replayed, None) is None and len(draws) == 2 * PER_CLASS * 2 - MEMORY
        buffer_module.np = _TorchDrawnNumpy(torch.Generator().manual_seed(SEED + 1))
        args = types.SimpleNamespace(
            maxlr=maxlr,
            minlr=5e-4,
            optim_mom=momentum,
            optim_wd=0.0,
            optim_nesterov=False,
            batch_size=batch,
            cutmix_alpha=None,
            debug_mode=False,
        )
        theirs: list[float] = []
        fitter = types.SimpleNamespace(
            args=args,
            buffer=buffer,
            transform=None,
            device=torch.device("cpu"),
            net=net,
            get_parameters=net.parameters,
            get_debug_iters=lambda: 0,
            loss=lambda out, y: _recorded(theirs, F.cross_entropy(out, y)),
        )
        ref.fit_buffer(fitter, 1)
    torch.testing.assert_close(_stored_inputs(strategy.memory, stream), buffer.examples, rtol=0, atol=0)
    assert sorted(strategy.train_data(stream[1]).targets.tolist()) == sorted(buffer.labels.tolist())

    # the same epoch on clpeft's side, the slots in the order Mammoth's get_data drew them
    order = torch.randperm(MEMORY, generator=torch.Generator().manual_seed(SEED + 1))
    optimizer = torch.optim.SGD(strategy.parameters(), lr=maxlr / 10, momentum=momentum)
    mine = []
    for slots in order.split(batch):
        x, y = strategy.memory.at(slots, stream).load()
        loss = strategy.training_step(Batch(x, y))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        mine.append(loss.item())
    assert len(mine) == len(theirs) == 3
    np.testing.assert_allclose(mine, theirs, rtol=0, atol=1e-6)
    _assert_same_parameters(strategy, net, atol=1e-6)


def test_gdumb_config_fits_with_mammoths_defaults():
    """GDumb's fitting is the run's ``train`` section: the shipped config uses Mammoth's ``--maxlr`` as
    the learning rate and its ``--fitting_epochs``."""
    with _mammoth("gdumb") as (ref, _):
        defaults = ref.GDumb.get_parser(argparse.ArgumentParser()).parse_args([])
    train = yaml.safe_load((CONFIGS / "digits_gdumb.yaml").read_text())["train"]
    assert (train["lr"], train["epochs"]) == (defaults.maxlr, defaults.fitting_epochs) == (0.05, 256)
    assert inspect.signature(GDumb).parameters["policy"].default == "class_balanced"


def _recorded(losses: list[float], loss: torch.Tensor) -> torch.Tensor:
    losses.append(loss.item())
    return loss
