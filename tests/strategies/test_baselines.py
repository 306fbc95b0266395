"""Tests for the baseline strategies (finetune, joint, replay, LwF, EWC) through the engine.

Each test runs a real (tiny) stream -- scikit-learn digits, 5 experiences of 2 classes, a
16-unit MLP backbone -- and spies on the strategy's hooks with ``monkeypatch`` to compare what
the strategy does with an independent computation: a numpy float64 loss written out from the
papers' formulas, a per-sample ``backward()`` loop for the Fisher, or plain counting.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import clpeft.config
import clpeft.engine
from clpeft.backbones.mlp import MLPBackbone
from clpeft.components.regularization.fisher import FisherPenalty
from clpeft.data import Batch, DataView
from clpeft.experience import Experience
from clpeft.strategies.ewc import EWC
from clpeft.strategies.joint import Joint
from clpeft.strategies.lwf import LwF
from clpeft.strategies.replay import Replay
from clpeft.strategy import Strategy

TRAIN_PER_CLASS = 12
EPOCHS = 2


@pytest.fixture(autouse=True)
def _cache_env(tmp_path, monkeypatch):
    monkeypatch.setenv("CLPEFT_CACHE", str(tmp_path / "cache"))


def _run(tmp_path, strategy: dict, frozen: bool = False, **train) -> dict:
    cfg = {
        "seed": 0,
        "scenario": {
            "name": "class_incremental",
            "dataset": "sklearn_digits",
            "n_experiences": 5,
            "train_per_class": TRAIN_PER_CLASS,
            "test_per_class": 4,
            "root": str(tmp_path / "data"),
        },
        "backbone": {"name": "mlp", "hidden": [16], "freeze": frozen},
        "strategy": strategy,
        "train": {"epochs": EPOCHS, "batch_size": 8, "lr": 0.1, "feature_cache": "memory", **train},
        "eval": {"batch_size": 64, "baseline": False},
        "logging": {"tensorboard": False, "progress": "never"},
    }
    return clpeft.engine.Engine(clpeft.config.resolve(cfg), tmp_path / "run", device="cpu").run()


# --------------------------------------------------------------------------------------------
# numpy references
# --------------------------------------------------------------------------------------------


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().cpu().numpy()


def _log_softmax(z):
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def _cross_entropy(logits, y):
    return float(-_log_softmax(logits)[np.arange(len(y)), y].mean())


def _distillation(student, teacher, T):
    """mean_b KL(softmax(t/T) || softmax(s[:, :n]/T))  (Li & Hoiem 2016, eq. 2; no T^2)."""
    n = teacher.shape[1]
    log_q = _log_softmax(teacher / T)
    log_p = _log_softmax(student[:, :n] / T)
    return float((np.exp(log_q) * (log_q - log_p)).sum(axis=1).mean())


def _linear(features, head):
    return features @ _np(head.weight).T + _np(head.bias)


# --------------------------------------------------------------------------------------------
# LwF
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("frozen", [False, True], ids=["trainable-backbone", "frozen-backbone"])
def test_lwf_loss_is_ce_plus_alpha_distillation_from_a_teacher_copy(tmp_path, monkeypatch, frozen):
    alpha, T = 0.7, 3.0
    teachers: dict[int, tuple] = {}  # experience -> (backbone copy, head copy), taken before it starts
    steps: list[dict] = []
    before, step = LwF.before_experience, LwF.training_step

    def spy_before(self, exp):
        teachers[exp.index] = (copy.deepcopy(self.backbone), copy.deepcopy(self.head))
        before(self, exp)

    def spy_step(self, batch):
        loss = step(self, batch)
        exp = max(teachers)
        with torch.no_grad():
            feats = _np(batch.x if self.uses_features else self.backbone(batch.x))
            y = batch.y.numpy()
            ce = _cross_entropy(_linear(feats, self.head), y)
            distill = 0.0
            t_backbone, t_head = teachers[exp]
            if t_head.n_classes:
                t_feats = feats if self.uses_features else _np(t_backbone(batch.x))
                distill = _distillation(_linear(feats, self.head), _linear(t_feats, t_head), T)
        steps.append(
            {
                "exp": exp,
                "loss": loss.item(),
                "ce": ce,
                "distill": distill,
                "expected": ce + alpha * distill,
                "uses_features": self.uses_features,
            }
        )
        return loss

    monkeypatch.setattr(LwF, "before_experience", spy_before)
    monkeypatch.setattr(LwF, "training_step", spy_step)
    _run(tmp_path, {"name": "lwf", "alpha": alpha, "temperature": T}, frozen=frozen, lr=0.5)

    steps_per_exp = EPOCHS * -(-2 * TRAIN_PER_CLASS // 8)
    assert len(steps) == 5 * steps_per_exp
    assert all(s["uses_features"] == frozen for s in steps)
    for s in steps:
        assert s["loss"] == pytest.approx(s["expected"], rel=1e-5, abs=1e-6), s
    # experience 0 has no teacher: plain cross-entropy
    assert all(s["distill"] == 0.0 for s in steps if s["exp"] == 0)
    second = [s for s in steps if s["exp"] == 1]
    # at the first step of experience 2 the student still equals its teacher on the old classes
    assert second[0]["distill"] == pytest.approx(0.0, abs=1e-9)
    # ... and it drifts afterwards, far enough that the loss check above could tell CE + alpha *
    # distillation from CE alone (10x the tolerance used there)
    assert max(alpha * s["distill"] / (1e-5 * s["loss"] + 1e-6) for s in second) > 10


def test_lwf_training_step_on_a_hand_built_setup():
    torch.manual_seed(0)
    backbone = MLPBackbone(input_shape=(1, 8, 8), hidden=[6], freeze=False)
    lwf = LwF(backbone, alpha=2.0, temperature=2.0)
    e0 = Experience(0, None, None, [0, 1], [0, 1])
    e1 = Experience(1, None, None, [2, 3], [0, 1, 2, 3])
    lwf.before_experience(e0)
    assert lwf.head.n_classes == 2 and lwf.teacher_head is None
    student = [*lwf.backbone.parameters(), *lwf.head.parameters()]
    with torch.no_grad():  # "training" on experience 0
        for p in student:
            p.add_(0.3 * torch.randn_like(p))
    lwf.after_experience(e0)
    teacher = copy.deepcopy(lwf)
    lwf.before_experience(e1)
    assert lwf.head.n_classes == 4 and lwf.teacher_head.n_classes == 2
    with torch.no_grad():  # "training" on experience 1 moves backbone and head (not the teacher)
        for p in [*lwf.backbone.parameters(), *lwf.head.parameters()]:
            p.add_(0.3 * torch.randn_like(p))
    x = torch.randint(0, 256, (10, 1, 8, 8), dtype=torch.uint8)
    y = torch.randint(0, 4, (10,))
    loss = lwf.training_step(Batch(x, y))

    with torch.no_grad():
        student = _linear(_np(lwf.backbone(x)), lwf.head)
        old = _linear(_np(teacher.backbone(x)), teacher.head)
    distill = _distillation(student, old, 2.0)
    assert distill > 1e-3
    assert loss.item() == pytest.approx(_cross_entropy(student, y.numpy()) + 2.0 * distill, rel=1e-5)
    # the loss trains the student only
    loss.backward()
    assert lwf.head.weight.grad is not None
    assert all(p.grad is None for p in lwf.teacher_head.parameters())
    assert all(p.grad is None for p in lwf.teacher_backbone.parameters())


# --------------------------------------------------------------------------------------------
# EWC
# --------------------------------------------------------------------------------------------


def _loop_fisher(strategy: Strategy, view: DataView) -> dict[str, torch.Tensor]:
    """Mean over the samples of ``view`` of squared per-sample cross-entropy gradients."""
    x, y = view.load()
    params = {n: p for n, p in strategy.named_parameters() if p.requires_grad}
    acc = {n: torch.zeros_like(p) for n, p in params.items()}
    for i in range(len(y)):
        strategy.zero_grad(set_to_none=True)
        F.cross_entropy(strategy.predict(x[i : i + 1]), y[i : i + 1]).backward()
        for n, p in params.items():
            acc[n] += p.grad**2
    strategy.zero_grad(set_to_none=True)
    return {n: a / len(y) for n, a in acc.items()}


def _penalty_np(strategy: Strategy) -> float:
    params = dict(strategy.named_parameters())
    total = 0.0
    for term in strategy.penalty.terms:
        for n, (anchor, f) in term.items():
            a = _np(anchor)
            p = _np(params[n])[tuple(slice(0, s) for s in a.shape)]
            total += float((_np(f) * (p - a) ** 2).sum())
    return total


def test_ewc_fisher_anchors_and_penalty_through_the_engine(tmp_path, monkeypatch):
    lam = 50.0
    events: list[dict] = []
    after, step = EWC.after_experience, EWC.training_step
    current = {"exp": -1}

    def spy_after(self, exp):
        after(self, exp)
        current["exp"] = exp.index + 1
        term = self.penalty.terms[-1]
        params = dict(self.named_parameters())
        assert set(term) == {n for n, p in params.items() if p.requires_grad}
        expected = _loop_fisher(self, exp.train)
        for n, (anchor, fisher) in term.items():
            assert torch.equal(anchor, params[n].detach())  # anchored at the parameters just learned
            torch.testing.assert_close(fisher, expected[n], rtol=1e-4, atol=1e-9)
        newest = FisherPenalty()
        newest.terms = [term]
        with torch.no_grad():
            events.append({"exp": exp.index, "kind": "after", "penalty": newest(params).item(), "total": self.penalty(params).item()})

    def spy_step(self, batch):
        loss = step(self, batch)
        with torch.no_grad():
            ce = _cross_entropy(_np(self.predict(batch.x)), batch.y.numpy())
            pen = _penalty_np(self)
        events.append({"exp": max(current["exp"], 0), "kind": "step", "penalty": pen, "loss": loss.item(), "expected": ce + lam / 2 * pen})
        return loss

    monkeypatch.setattr(EWC, "after_experience", spy_after)
    monkeypatch.setattr(EWC, "training_step", spy_step)
    _run(tmp_path, {"name": "ewc", "ewc_lambda": lam}, frozen=False)

    afters = [e for e in events if e["kind"] == "after"]
    assert [e["exp"] for e in afters] == [0, 1, 2, 3, 4]
    assert all(e["penalty"] == 0.0 for e in afters)  # parameters equal their newest anchors
    assert afters[0]["total"] == 0.0 and afters[-1]["total"] > 0.0  # older terms still pull
    for e in events:
        if e["kind"] == "step":
            assert e["loss"] == pytest.approx(e["expected"], rel=1e-5, abs=1e-7), e
    second = [e for e in events if e["kind"] == "step" and e["exp"] == 1]
    assert second[0]["penalty"] == 0.0  # the grown head's old rows are unchanged at step one
    assert second[1]["penalty"] > 0.0  # one optimizer step later the parameters moved
    assert all(e["penalty"] == 0.0 for e in events if e["kind"] == "step" and e["exp"] == 0)


def test_ewc_state_dict_round_trip_keeps_the_penalty(tmp_path, monkeypatch):
    kept = {}
    after = EWC.after_experience

    def spy_after(self, exp):
        after(self, exp)
        kept["strategy"] = self

    monkeypatch.setattr(EWC, "after_experience", spy_after)
    _run(tmp_path, {"name": "ewc", "ewc_lambda": 10.0}, frozen=False)
    src = kept["strategy"]
    torch.manual_seed(1)
    dst = EWC(MLPBackbone(input_shape=(1, 8, 8), hidden=[16]), ewc_lambda=10.0)
    dst.load_state_dict(copy.deepcopy(src.state_dict()))
    assert len(dst.penalty.terms) == len(src.penalty.terms) == 5
    with torch.no_grad():
        for p in dst.parameters():
            p.add_(0.01)
        for p in src.parameters():
            p.add_(0.01)
    assert dst.penalty(dict(dst.named_parameters())).item() == pytest.approx(src.penalty(dict(src.named_parameters())).item(), rel=1e-6)


# --------------------------------------------------------------------------------------------
# joint and replay: what each experience trains on
# --------------------------------------------------------------------------------------------


def _spy_train_data(monkeypatch, cls, record):
    original = cls.train_data
    step = cls.training_step

    def spy(self, exp):
        view = original(self, exp)
        record.append({"exp": exp, "view": view, "buffer": len(getattr(self, "buffer", ())), "trained": 0})
        return view

    def count(self, batch):
        record[-1]["trained"] += len(batch.y)
        return step(self, batch)

    monkeypatch.setattr(cls, "train_data", spy)
    monkeypatch.setattr(cls, "training_step", count)


def test_joint_trains_on_the_union_of_all_experiences_so_far(tmp_path, monkeypatch):
    record: list[dict] = []
    _spy_train_data(monkeypatch, Joint, record)
    _run(tmp_path, {"name": "joint"}, frozen=True)
    assert [r["exp"].index for r in record] == [0, 1, 2, 3, 4]
    for i, r in enumerate(record):
        exps = [*r["exp"].past, r["exp"]]
        assert len(r["view"]) == sum(len(e.train) for e in exps) == 2 * TRAIN_PER_CLASS * (i + 1)
        # the very same samples, in stream order
        expected = torch.cat([e.train.load()[0] for e in exps])
        assert torch.equal(r["view"].load()[0], expected)
        assert sorted(r["view"].targets.tolist()) == sorted(sum((e.train.targets.tolist() for e in exps), []))
        assert r["trained"] == EPOCHS * len(r["view"])  # the engine really trains on it


@pytest.mark.parametrize("policy", ["reservoir", "class_balanced", "herding"])
def test_replay_trains_on_the_experience_plus_the_memory(tmp_path, monkeypatch, policy):
    mem = 20
    record: list[dict] = []
    _spy_train_data(monkeypatch, Replay, record)
    _run(tmp_path, {"name": "replay", "mem_size": mem, "policy": policy}, frozen=True)
    assert [r["exp"].index for r in record] == [0, 1, 2, 3, 4]
    for i, r in enumerate(record):
        exp = r["exp"]
        if policy == "reservoir":
            assert r["buffer"] == (0 if i == 0 else min(mem, 2 * TRAIN_PER_CLASS * i))
        else:  # whether it fills up is checked in tests/components/test_replay.py
            assert (i == 0) == (r["buffer"] == 0) and r["buffer"] <= mem
        assert len(r["view"]) == len(exp.train) + r["buffer"]
        assert r["trained"] == EPOCHS * len(r["view"])
        labels = r["view"].targets
        new = labels[torch.isin(labels, torch.tensor(exp.classes_in_this_experience))]
        old = labels[~torch.isin(labels, torch.tensor(exp.classes_in_this_experience))]
        assert len(new) == len(exp.train) and len(old) == r["buffer"]
        assert all(c < min(exp.classes_in_this_experience) for c in old.tolist())  # replayed = past classes
        if policy == "class_balanced" and i > 0:
            counts = torch.bincount(old, minlength=2 * i)[: 2 * i]
            assert counts.max() - counts.min() <= 1
        if policy == "herding" and i > 0:  # iCaRL: mem // classes seen, for every class seen
            assert torch.bincount(old, minlength=2 * i)[: 2 * i].tolist() == [mem // (2 * i)] * (2 * i)


@pytest.mark.parametrize("frozen", [False, True], ids=["trainable-backbone", "frozen-backbone"])
def test_replay_herding_selects_on_the_trained_backbone_features(tmp_path, monkeypatch, frozen):
    """The features handed to the buffer are the backbone's (cached when frozen) features of the
    experience's training samples, in order, after training on it."""
    from clpeft.components.memory.replay import ReplayBuffer

    checked = []
    update = ReplayBuffer.update

    def spy_update(self, exp, generator=None, features=None):
        strategy = holder["strategy"]
        with torch.no_grad():
            x, _ = exp.train.load()
            expected = strategy.backbone(x)
        torch.testing.assert_close(features, expected, rtol=1e-5, atol=1e-6)
        checked.append(exp.index)
        update(self, exp, generator, features)

    holder = {}
    after = Replay.after_experience

    def spy_after(self, exp):
        holder["strategy"] = self
        after(self, exp)

    monkeypatch.setattr(ReplayBuffer, "update", spy_update)
    monkeypatch.setattr(Replay, "after_experience", spy_after)
    _run(tmp_path, {"name": "replay", "mem_size": 20, "policy": "herding"}, frozen=frozen)
    assert checked == [0, 1, 2, 3, 4]


def test_finetune_trains_on_the_experience_only(tmp_path, monkeypatch):
    from clpeft.strategies.finetune import Finetune

    record: list[dict] = []
    _spy_train_data(monkeypatch, Finetune, record)
    result = _run(tmp_path, {"name": "finetune"}, frozen=True)
    for r in record:
        assert r["view"] is r["exp"].train
        assert r["trained"] == EPOCHS * 2 * TRAIN_PER_CLASS
    R = np.asarray(result["acc_matrix"])
    assert R.shape == (5, 5)
    # a head that has never seen class c cannot predict it: accuracy on future experiences is 0
    assert all(R[i, j] == 0.0 for i in range(5) for j in range(i + 1, 5))
