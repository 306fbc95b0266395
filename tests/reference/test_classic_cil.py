"""iCaRL, SI and MAS against their official or reference code.

* **iCaRL** (``strategies/icarl.py``): ``loss: bce`` against Mammoth's ``models/icarl.py``
  (``ICarl.get_loss``: the loss of every step and the parameters after them); ``loss: ce``
  against LAMDA-PILOT's ``models/icarl.py`` (``Learner._update_representation``: the parameters
  after an epoch of SGD with momentum, as PILOT trains; PILOT's soft cross-entropy differs from
  clpeft's KL distillation by the teacher's entropy, a constant, so parameters are compared, not
  loss values); the exemplar lists, the class means and the nearest-mean predictions against
  PILOT's ``BaseLearner`` (``build_rehearsal_memory``, ``_class_means``, ``_eval_nme``) on the same
  network; the defaults against ``exps/icarl.json``.
* **BiC** (``strategies/bic.py``) against Mammoth's ``models/bic.py``: the parameters after the
  second experience's steps (``observe``: ``(1 - lambda) CE + lambda T^2`` distillation), and
  ``alpha, beta`` fitted on the same validation batches (``end_task``).
* **SI** (``strategies/si.py``) against Mammoth's ``models/si.py`` (``observe``/``end_task``): the loss
  of every step, ``Omega`` and every parameter after each of two experiences.
* **MAS** (``strategies/mas.py``) against Avalanche's ``MASPlugin`` (``before_backward``,
  ``after_training_exp``): the importance and every parameter after each of two experiences with
  ``per_sample: false``; the paper's per-sample importance equals Avalanche's with batches of one
  sample; the defaults against the plugin's.

Both sides start from the same tiny MLP (6 inputs, 8 hidden units; the reference network is a
copy of clpeft's backbone and head) and see the same batches of a two-experience stream of two
classes each, in the same order. Where the reference has every class's output from the start
(Mammoth, Avalanche here), clpeft's head is grown to all 4 classes first. The references run on
namespaces holding what their methods read, so no reference dataset or training loop is involved.

Tolerances: float32 on both sides, same operations: ``atol=1e-6`` (parameters, losses), ``1e-5``
relative for ``Omega`` (a quotient of small differences). Mutations checked to fail here: BiC's distillation without ``T^2``; the correction
fitted as ``alpha (o + beta)``; iCaRL's
old targets taken from the logits instead of their sigmoid, or the old model's targets on all
columns; PILOT's distillation with a ``T^2`` factor; the NME without renormalising the class
mean; SI's path integral with the total loss's gradient (penalty included) or without the clipping;
``Omega`` divided by ``Delta`` instead of ``Delta^2``; MAS's new importance entering with weight
``alpha`` instead of ``1 - alpha``.
"""

from __future__ import annotations

import argparse
import copy
import inspect
import json
import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from clpeft.backbones.mlp import MLPBackbone
from clpeft.components.heads.bias_correction import BiasCorrection
from clpeft.data import ArrayDataset, Batch, DataView
from clpeft.data_access import DataAccess
from clpeft.experience import Experience
from clpeft.strategies.bic import BiC
from clpeft.strategies.icarl import ICaRL
from clpeft.strategies.mas import MAS
from clpeft.strategies.si import SI

from .conftest import load_reference, ref_dir, stub_module
from .test_herding import _IdDataset, _PilotDataManager  # PILOT's dataset and data manager over sample ids

N_CLASSES, PER_CLASS, BATCH, LR, EPOCHS = 4, 12, 8, 0.1, 2
ATOL = {"atol": 1e-6, "rtol": 0.0}


# --------------------------------------------------------------------------------------------
# the problem and both sides' networks
# --------------------------------------------------------------------------------------------


def _stream(scale: float = 1.0) -> list[Experience]:
    """Two experiences of two classes over 6-dimensional inputs (times ``scale``); positions in a view
    differ from dataset indices."""
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(N_CLASSES).repeat_interleave(PER_CLASS)
    inputs = (torch.randn(len(labels), 6, generator=g) + labels[:, None].float()) * scale
    dataset = ArrayDataset(inputs, labels, "classic-toy")
    stream = []
    for k in range(2):
        idx = torch.nonzero(labels // 2 == k).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        stream.append(Experience(k, DataView.of(dataset, idx), None, [2 * k, 2 * k + 1], list(range(2 * k + 2))))
    for k, exp in enumerate(stream):
        exp.past = tuple(stream[:k])
    return stream


def _strategy(cls, **options):
    torch.manual_seed(0)
    strategy = cls(MLPBackbone(input_shape=(6,), hidden=[8], scale=1.0), **options)
    strategy.attach(DataAccess(torch.device("cpu"), None, strategy.backbone, batch_size=BATCH))
    return strategy


def _copy_net(strategy, head=None) -> nn.Sequential:
    """The reference's network: a copy of clpeft's backbone layers and head (as an ``nn.Linear``)."""
    head = strategy.head if head is None else head
    linear = nn.Linear(head.in_features, head.n_classes)
    linear.weight.data.copy_(head.weight.data)
    linear.bias.data.copy_(head.bias.data)
    return nn.Sequential(copy.deepcopy(strategy.backbone.net), linear)


def _batches(exp: Experience, epochs: int = EPOCHS):
    """``epochs`` passes over the experience's batches in view order: ``(positions, inputs, labels)``."""
    for _ in range(epochs):
        for positions in torch.arange(len(exp.train)).split(BATCH):
            x, y = exp.train.load(positions)
            yield positions, x, y


def _step(strategy, optimizer, positions, x, y) -> float:
    """The engine's step: loss, backward, ``after_backward``, optimizer step, ``after_training_step``."""
    loss = strategy.training_step(Batch(x, y, index=positions))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    strategy.after_backward()
    optimizer.step()
    strategy.after_training_step()
    return loss.item()


def _trainable(strategy) -> list[torch.Tensor]:
    return [p for p in strategy.parameters() if p.requires_grad]


def _train_experience(strategy, exp: Experience) -> list[float]:
    """clpeft's hooks around ``EPOCHS`` of SGD steps on ``exp``; the loss of every step."""
    strategy.before_experience(exp)
    optimizer = torch.optim.SGD(_trainable(strategy), lr=LR)
    losses = [_step(strategy, optimizer, *batch) for batch in _batches(exp)]
    strategy.after_experience(exp)
    return losses


def _assert_same_parameters(strategy, net: nn.Module, **tolerance) -> None:
    mine = [*strategy.backbone.net.parameters(), *strategy.head.parameters()]
    theirs = list(net.parameters())
    assert len(mine) == len(theirs)
    for a, b in zip(mine, theirs):
        torch.testing.assert_close(a.detach(), b.detach(), **(tolerance or ATOL))


# --------------------------------------------------------------------------------------------
# iCaRL
# --------------------------------------------------------------------------------------------


def _mammoth_stubs() -> dict:
    root = ref_dir("mammoth")
    return {
        "datasets": stub_module("datasets", get_dataset=None),
        "utils": stub_module("utils", __path__=[str(root / "utils")], binary_to_boolean_type=lambda v: str(v).lower() in ("1", "true")),
        "utils.args": stub_module("utils.args", ArgumentParser=argparse.ArgumentParser, add_rehearsal_args=lambda parser: None),
        "utils.batch_norm": stub_module("utils.batch_norm", bn_track_stats=None),
        "utils.buffer": stub_module("utils.buffer", Buffer=None, icarl_replay=None, fill_buffer=None),
        "models.utils": stub_module("models.utils", __path__=[str(root / "models" / "utils")]),
        "models.utils.continual_model": stub_module("models.utils.continual_model", ContinualModel=nn.Module),
    }


def _icarl_after_first(loss: str, mem_size: int = 8):
    """clpeft's iCaRL trained on the first experience (SGD), then started on the second."""
    stream = _stream()
    strategy = _strategy(ICaRL, mem_size=mem_size, loss=loss)
    _train_experience(strategy, stream[0])
    strategy.before_experience(stream[1])
    return strategy, stream


def test_icarl_bce_equals_mammoth():
    strategy, stream = _icarl_after_first("bce")
    teacher = strategy.rehearsal.teacher
    assert teacher is not None and teacher.head.n_classes == 2 and strategy.head.n_classes == N_CLASSES
    net = _copy_net(strategy)
    old_net = nn.Sequential(copy.deepcopy(teacher.backbone.net), _copy_net(strategy, teacher.head)[1])
    with load_reference("mammoth", "models.icarl", stubs=_mammoth_stubs()) as ref:
        observer = types.SimpleNamespace(net=net, eye=torch.eye(N_CLASSES), n_past_classes=2)
        opt_ref = torch.optim.SGD(net.parameters(), lr=LR)
        optimizer = torch.optim.SGD(_trainable(strategy), lr=LR)
        for positions, x, y in _batches(stream[1]):
            mine = _step(strategy, optimizer, positions, x, y)
            with torch.no_grad():
                old = torch.sigmoid(old_net(x))
            theirs = ref.ICarl.get_loss(observer, x, y, 1, old)
            opt_ref.zero_grad()
            theirs.backward()
            opt_ref.step()
            assert mine == pytest.approx(theirs.item(), abs=1e-6)
    _assert_same_parameters(strategy, net)


class _PilotNet(nn.Module):
    """PILOT's ``IncrementalNet`` interface over clpeft's layers: ``{"logits": ...}`` and ``extract_vector``."""

    def __init__(self, body: nn.Module, head: nn.Module, inputs: torch.Tensor | None = None):
        super().__init__()
        self.body, self.head, self.inputs = body, head, inputs
        self.feature_dim = head.in_features

    def forward(self, x):
        return {"logits": self.head(self.body(x))}

    def extract_vector(self, ids):
        return self.body(self.inputs[ids.long()])


def test_icarl_ce_equals_pilot(monkeypatch):
    strategy, stream = _icarl_after_first("ce")
    teacher = strategy.rehearsal.teacher
    net = _copy_net(strategy)
    old = _copy_net(strategy, teacher.head)
    old[0] = copy.deepcopy(teacher.backbone.net)
    batches = [(x, y) for _, x, y in _batches(stream[1], 1)]
    stubs = {"utils.inc_net": stub_module("utils.inc_net", IncrementalNet=None, CosineIncrementalNet=None)}
    with load_reference("pilot", "models.icarl", stubs=stubs) as ref:
        learner = ref.Learner.__new__(ref.Learner)
        learner._network, learner._old_network = _PilotNet(net[0], net[1]), _PilotNet(old[0], old[1])
        learner._known_classes, learner._cur_task, learner._device = 2, 1, "cpu"
        learner.args = {"epochs": 1, "T": strategy.temperature}
        learner._compute_accuracy = lambda model, loader: 0.0
        loader = [(torch.arange(len(y)), x, y) for x, y in batches]
        optimizer = torch.optim.SGD(learner._network.parameters(), lr=LR, momentum=0.9)
        learner._update_representation(loader, None, optimizer, torch.optim.lr_scheduler.StepLR(optimizer, 10))
    optimizer = torch.optim.SGD(_trainable(strategy), lr=LR, momentum=0.9)
    for positions, x, y in _batches(stream[1], 1):
        _step(strategy, optimizer, positions, x, y)
    _assert_same_parameters(strategy, net)


def test_icarl_exemplars_means_and_nme_predictions_equal_pilot(monkeypatch):
    """Exemplars (ids, in selection order), class means and NME predictions after each experience."""
    stream = _stream()
    dataset = stream[0].train.parts[0][0]
    inputs, labels = dataset.inputs, dataset.targets
    strategy = _strategy(ICaRL, mem_size=10, loss="ce")
    with load_reference("pilot", "models.base") as base:
        monkeypatch.setattr(base, "DataLoader", lambda *a, **k: torch.utils.data.DataLoader(*a, **{**k, "num_workers": 0}))
        learner = base.BaseLearner({"memory_size": 10, "device": ["cpu"]})
        manager = _PilotDataManager(labels)
        for exp in stream:
            _train_experience(strategy, exp)
            learner._network = _PilotNet(strategy.backbone.net, strategy.head, inputs)
            learner._known_classes, learner._total_classes = 2 * exp.index, 2 * exp.index + 2
            learner.build_rehearsal_memory(manager, learner.samples_per_class)
            learner._known_classes = learner._total_classes

            ids = torch.stack([stream[e].train.parts[0][1][p] for e, p in strategy.rehearsal.memory.items.tolist()])
            mine = {c: ids[strategy.rehearsal.memory.labels == c].tolist() for c in range(learner._total_classes)}
            theirs_ids, theirs_y = learner._data_memory.astype(int), learner._targets_memory.astype(int)
            assert mine == {c: theirs_ids[theirs_y == c].tolist() for c in range(learner._total_classes)}
            torch.testing.assert_close(strategy.means.prototypes, torch.from_numpy(learner._class_means), atol=1e-6, rtol=0.0)
            test_ids = torch.arange(len(labels))
            loader = torch.utils.data.DataLoader(_IdDataset(test_ids, labels), batch_size=16)
            predicted, _ = learner._eval_nme(loader, learner._class_means)
            with torch.no_grad():
                assert torch.equal(strategy.predict(inputs).argmax(1), torch.from_numpy(predicted[:, 0]))
    assert len(strategy.rehearsal.memory) == 8 and learner.samples_per_class == 2  # 10 // 4 per class


def test_icarl_defaults_are_pilots():
    with open(ref_dir("pilot") / "exps" / "icarl.json") as f:
        exp = json.load(f)
    defaults = {n: p.default for n, p in inspect.signature(ICaRL).parameters.items()}
    assert (defaults["mem_size"], defaults["temperature"]) == (exp["memory_size"], exp["T"])


# --------------------------------------------------------------------------------------------
# BiC
# --------------------------------------------------------------------------------------------


def _mammoth_loss(outputs, labels, reduction="mean"):
    return F.cross_entropy(outputs, labels, reduction=reduction)


def test_bic_training_equals_mammoth():
    stream = _stream()
    strategy = _strategy(BiC, mem_size=8, temperature=3.0)
    _train_experience(strategy, stream[0])
    strategy.before_experience(stream[1])
    teacher = strategy.rehearsal.teacher
    net = _copy_net(strategy)
    old_net = nn.Sequential(copy.deepcopy(teacher.backbone.net), _copy_net(strategy, teacher.head)[1])
    with load_reference("mammoth", "models.bic", stubs=_mammoth_stubs()) as ref:
        observer = types.SimpleNamespace(
            net=net,
            old_net=old_net,
            opt=torch.optim.SGD(net.parameters(), lr=LR),
            loss=_mammoth_loss,
            current_task=1,
            cpt=2,
            lamda=1 / 2,
            args=types.SimpleNamespace(temp=3.0, wd_reg=None, distill_after_bic=True),
        )
        optimizer = torch.optim.SGD(_trainable(strategy), lr=LR)
        for positions, x, y in _batches(stream[1]):
            _step(strategy, optimizer, positions, x, y)
            ref.BiC.observe(observer, x, y, x)
    _assert_same_parameters(strategy, net)


def test_bic_bias_correction_equals_mammoth():
    torch.manual_seed(1)
    net = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, N_CLASSES))
    val = [(torch.randn(5, 6) * 2, torch.randint(N_CLASSES, (5,))) for _ in range(4)]
    epochs = 30
    mine = BiasCorrection()
    with torch.no_grad():
        mine.fit(lambda: [(net(x), y) for x, y in val], 2, N_CLASSES, epochs)
    with load_reference("mammoth", "models.bic", stubs=_mammoth_stubs()) as ref:
        observer = types.SimpleNamespace(
            net=net,
            current_task=1,
            n_past_classes=2,
            n_seen_classes=N_CLASSES,
            loss=F.cross_entropy,
            device=torch.device("cpu"),
            val_loader=val,
            args=types.SimpleNamespace(bic_epochs=epochs),
            forward=lambda x: net(x).clone(),
            evaluate_bias=lambda prefix: None,
            build_buffer=lambda dataset: None,
        )
        ref.BiC.end_task(observer, types.SimpleNamespace(evaluate=lambda model, dataset: None))
    beta, alpha = observer.corr_factors.detach()
    assert (float(alpha), float(beta)) != (1.0, 0.0)
    torch.testing.assert_close((mine.alpha, mine.beta), (alpha, beta), **ATOL)
    logits = net(val[0][0]).detach()
    corrected = mine(logits)
    assert torch.equal(corrected[:, :2], logits[:, :2])
    torch.testing.assert_close(corrected[:, 2:], logits[:, 2:] * alpha + beta, **ATOL)


# --------------------------------------------------------------------------------------------
# SI
# --------------------------------------------------------------------------------------------


class _FlatNet(nn.Sequential):
    """What Mammoth's ``MammothBackbone`` gives SI: every parameter as one flat vector, and its gradient."""

    def get_params(self):
        return torch.cat([p.reshape(-1) for p in self.parameters()])

    def get_grads(self):
        return torch.cat([p.grad.reshape(-1) for p in self.parameters()])

    def set_grads(self, grads):
        start = 0
        for p in self.parameters():
            p.grad = grads[start : start + p.numel()].view_as(p).clone()
            start += p.numel()


@pytest.mark.parametrize("clip_value", [1.0, None], ids=["clipped", "unclipped"])
def test_si_equals_mammoth(clip_value):
    c, xi = 0.3, 0.1
    stream = _stream(scale=5.0)  # gradients above 1: the clipping acts
    strategy = _strategy(SI, c=c, xi=xi, clip_value=clip_value)
    strategy.head.grow_to(N_CLASSES)
    net = _FlatNet(*_copy_net(strategy))
    with load_reference("mammoth", "models.si", stubs=_mammoth_stubs()) as ref:
        observer = types.SimpleNamespace(
            net=net,
            opt=torch.optim.SGD(net.parameters(), lr=LR),
            loss=F.cross_entropy,
            device=torch.device("cpu"),
            args=types.SimpleNamespace(c=c, xi=xi),
            checkpoint=net.get_params().data.clone(),
            big_omega=None,
            small_omega=0,
            get_parameters=net.parameters,
        )
        observer.get_penalty_grads = lambda: ref.SI.get_penalty_grads(observer)
        clipped = []
        if clip_value is None:  # the reference always clips: hand it a stand-in parameter to clip
            stand_in = nn.Parameter(torch.zeros(1))
            stand_in.grad = torch.zeros(1)
            observer.get_parameters = lambda: [stand_in]
        for exp in stream:
            strategy.before_experience(exp)
            optimizer = torch.optim.SGD(_trainable(strategy), lr=LR)
            for positions, x, y in _batches(exp):
                mine = _step(strategy, optimizer, positions, x, y)
                clipped.append(any(bool((p.grad.abs() == 1).any()) for p in _trainable(strategy)))
                assert mine == pytest.approx(ref.SI.observe(observer, x, y, x), abs=1e-6)
            strategy.after_experience(exp)
            ref.SI.end_task(observer, None)
            _assert_same_parameters(strategy, net)
            (term,) = strategy.penalty.terms
            omega = torch.cat([term[n][1].reshape(-1) for n, _ in strategy.named_parameters()])
            torch.testing.assert_close(omega, observer.big_omega, rtol=1e-5, atol=1e-7)
    assert any(clipped) == (clip_value is not None)  # the clipping was exercised


# --------------------------------------------------------------------------------------------
# MAS
# --------------------------------------------------------------------------------------------


avalanche_plugins = pytest.importorskip("avalanche.training.plugins")


def _avalanche_mas_side(strategy, stream, lambda_reg, alpha, batch_size):
    """Avalanche's ``MASPlugin`` driving a copy of clpeft's network through the same batches."""
    net = _copy_net(strategy)
    plugin = avalanche_plugins.MASPlugin(lambda_reg=lambda_reg, alpha=alpha)
    optimizer = torch.optim.SGD(net.parameters(), lr=LR)
    runner = types.SimpleNamespace(
        model=net, optimizer=optimizer, train_mb_size=batch_size, device="cpu", clock=types.SimpleNamespace(train_exp_counter=0), loss=None
    )
    importances = []
    for exp in stream:
        runner.clock.train_exp_counter = exp.index
        x_all, y_all = exp.train.load()
        runner.experience = types.SimpleNamespace(dataset=torch.utils.data.TensorDataset(x_all, y_all, torch.zeros_like(y_all)))
        for _, x, y in _batches(exp):
            runner.loss = F.cross_entropy(net(x), y)
            plugin.before_backward(runner)
            optimizer.zero_grad()
            runner.loss.backward()
            optimizer.step()
        plugin.after_training_exp(runner)
        importances.append(torch.cat([plugin.importance[n].data.reshape(-1) for n, _ in net.named_parameters()]))
    return net, importances


@pytest.mark.filterwarnings("ignore::DeprecationWarning")
def test_mas_equals_avalanche():
    lambda_reg, alpha = 0.5, 0.3
    stream = _stream()
    strategy = _strategy(MAS, lambda_reg=lambda_reg, alpha=alpha, per_sample=False, importance_batch_size=BATCH)
    strategy.head.grow_to(N_CLASSES)
    net, importances = _avalanche_mas_side(strategy, stream, lambda_reg, alpha, BATCH)
    for exp in stream:
        _train_experience(strategy, exp)
        (term,) = strategy.penalty.terms
        omega = torch.cat([term[n][1].reshape(-1) for n, _ in strategy.named_parameters()])
        torch.testing.assert_close(omega, importances[exp.index], rtol=1e-5, atol=1e-7)
    _assert_same_parameters(strategy, net)


def test_mas_per_sample_importance_is_avalanches_with_batches_of_one():
    stream = _stream()[:1]
    strategy = _strategy(MAS, per_sample=True, importance_batch_size=5)
    strategy.before_experience(stream[0])
    plugin = avalanche_plugins.MASPlugin()
    net = _copy_net(strategy)
    x_all, y_all = stream[0].train.load()
    runner = types.SimpleNamespace(
        model=net,
        optimizer=torch.optim.SGD(net.parameters(), lr=LR),
        train_mb_size=1,
        device="cpu",
        experience=types.SimpleNamespace(dataset=torch.utils.data.TensorDataset(x_all, y_all, torch.zeros_like(y_all))),
    )
    theirs = plugin._get_importance(runner)
    strategy.after_experience(stream[0])
    (term,) = strategy.penalty.terms
    for (n, _), (m, _) in zip(strategy.named_parameters(), net.named_parameters()):
        torch.testing.assert_close(term[n][1], theirs[m].data, rtol=1e-5, atol=1e-7)


def test_mas_defaults_are_avalanches():
    theirs = inspect.signature(avalanche_plugins.MASPlugin).parameters
    mine = inspect.signature(MAS).parameters
    assert (mine["lambda_reg"].default, mine["alpha"].default) == (theirs["lambda_reg"].default, theirs["alpha"].default)
