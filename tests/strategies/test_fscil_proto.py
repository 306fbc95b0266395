"""fscil_proto on hand-built few-shot sessions of scikit-learn digits.

Session 0: classes 0-5 with all their training data (trained here with the strategy's own
``training_step``, as the engine does); sessions 1 and 2: two new classes with 5 shots each.
Prototypes and cosine logits are checked against numpy.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from clpeft.backbones.cnn import CNNBackbone
from clpeft.data import ArrayDataset, Batch, DataView
from clpeft.data_access import DataAccess
from clpeft.experience import Experience
from clpeft.registry import strategies

K_SHOT = 5


@pytest.fixture(scope="module")
def sessions():
    d = load_digits()
    x = torch.from_numpy((d.images * 255 / 16).round().astype("uint8")).unsqueeze(1)
    y = torch.from_numpy(d.target)
    train = ArrayDataset(x[:1400], y[:1400], "digits/train")
    test = ArrayDataset(x[1400:], y[1400:], "digits/test")
    rng = np.random.default_rng(0)
    ytr, yte = y[:1400].numpy(), y[1400:].numpy()

    def view(ds, labels, classes, shots=None):
        idx = [rng.permutation(np.flatnonzero(labels == c))[:shots] for c in classes]
        return DataView.of(ds, np.sort(np.concatenate(idx)))

    groups = [[0, 1, 2, 3, 4, 5], [6, 7], [8, 9]]
    exps, seen = [], []
    for i, classes in enumerate(groups):
        seen = seen + classes
        exps.append(
            Experience(
                i,
                view(train, ytr, classes, None if i == 0 else K_SHOT),
                view(test, yte, classes),
                classes,
                list(seen),
                n_way=None if i == 0 else 2,
                k_shot=None if i == 0 else K_SHOT,
            )
        )
    return exps


def _new(seed: int = 0):
    torch.manual_seed(seed)
    s = strategies.get("fscil_proto")(CNNBackbone((1, 8, 8), widths=[16, 32]))
    s.attach(DataAccess(torch.device("cpu"), None, s.backbone, 64))
    return s


def _train_base(s, exp, epochs: int = 5):
    opt = torch.optim.SGD([g for grp in s.param_groups(0.1) for g in grp["params"]], lr=0.1, momentum=0.9)
    x, y = exp.train.load()
    for _ in range(epochs):
        s.train()
        perm = torch.randperm(len(y))
        for i in range(0, len(y), 64):
            idx = perm[i : i + 64]
            loss = s.training_step(Batch(x[idx], y[idx]))
            opt.zero_grad()
            loss.backward()
            opt.step()
    s.eval()


def _np_features(s, view):
    x, y = view.load()
    with torch.no_grad():
        return s.backbone(x).double().numpy(), y.numpy()


def _np_cosine_logits(feats, protos, scale=16.0):
    f = feats / np.linalg.norm(feats, axis=1, keepdims=True)
    p = protos / np.linalg.norm(protos, axis=1, keepdims=True)
    return scale * f @ p.T


def test_base_training_then_frozen_prototypes_for_k_shot_sessions(sessions):
    assert all(e.k_shot == K_SHOT and len(e.train) == K_SHOT * len(e.classes_in_this_experience) for e in sessions[1:])
    s = _new()
    base = sessions[0]
    s.before_experience(base)
    assert s.count_parameters()["trainable"] > 0 and not s.uses_features
    _train_base(s, base)
    s.after_experience(base)
    assert s.backbone.frozen and not any(p.requires_grad for p in s.parameters())
    feats, y = _np_features(s, base.train)
    expected = np.stack([feats[y == c].mean(0) for c in range(6)])
    np.testing.assert_allclose(s.prototypes.double().numpy(), expected, rtol=1e-5, atol=1e-6)
    base_protos = s.prototypes.clone()

    for exp in sessions[1:]:
        s.before_experience(exp)
        s.refresh_input_mode()  # as the engine does after before_experience
        assert s.uses_features  # frozen backbone: later sessions run on (cached) features
        assert not [p for g in s.param_groups(0.1) for p in g["params"]]  # nothing to train: the engine skips it
        s.after_experience(exp)
        feats, y = _np_features(s, exp.train)
        for c in exp.classes_in_this_experience:
            np.testing.assert_allclose(s.prototypes[c].double().numpy(), feats[y == c].mean(0), rtol=1e-5, atol=1e-6)
    assert s.prototypes.shape[0] == 10 and torch.equal(s.prototypes[:6], base_protos)

    test = sessions[0].test + sessions[1].test + sessions[2].test
    feats, y = _np_features(s, test)
    with torch.no_grad():
        logits = s.predict(s.backbone(test.load()[0]))
    np.testing.assert_allclose(logits.double().numpy(), _np_cosine_logits(feats, s.prototypes.double().numpy()), rtol=1e-4, atol=1e-4)
    pred = logits.argmax(1).numpy()
    novel = y >= 6
    assert (pred[~novel] == y[~novel]).mean() > 0.8
    assert (pred[novel] == y[novel]).mean() > 0.4  # 4 novel classes from 5 shots each; chance is 0.1


def test_state_dict_round_trip_restores_prototypes_and_frozen_backbone(sessions):
    s = _new()
    s.before_experience(sessions[0])
    _train_base(s, sessions[0], epochs=1)
    s.after_experience(sessions[0])
    s.before_experience(sessions[1])
    s.after_experience(sessions[1])
    fresh = _new(seed=3)
    fresh.load_state_dict(copy.deepcopy(s.state_dict()))
    assert fresh.prototypes.shape == (8, s.backbone.feature_dim) and fresh.backbone.frozen
    x = sessions[1].test.load()[0]
    with torch.no_grad():
        assert torch.equal(fresh.predict(fresh.backbone(x)), s.predict(s.backbone(x)))


def test_through_the_engine_base_classes_survive_the_few_shot_sessions(tmp_path):
    """The few_shot_class_incremental stream (6 base classes, 2 sessions of 2-way 5-shot): the
    frozen-prototype model keeps the base classes (finetune drops them to 0) and learns the novel ones."""
    import clpeft.config
    import clpeft.engine

    cfg = {
        "seed": 0,
        "scenario": {
            "name": "few_shot_class_incremental",
            "dataset": "sklearn_digits",
            "n_base": 6,
            "n_way": 2,
            "k_shot": K_SHOT,
            "root": str(tmp_path / "data"),
        },
        "backbone": {"name": "cnn", "widths": [16, 32]},
        "strategy": {"name": "fscil_proto"},
        "train": {"epochs": 5, "batch_size": 64, "lr": 0.1, "optimizer": "sgd", "momentum": 0.9},
        "eval": {"baseline": False},
        "logging": {"tensorboard": False, "progress": "never"},
    }
    R = np.asarray(clpeft.engine.Engine(clpeft.config.resolve(cfg), tmp_path / "run", device="cpu").run()["acc_matrix"])
    assert R.shape == (3, 3)
    assert R[0, 0] > 0.9 and R[2, 0] > R[0, 0] - 0.1  # base accuracy barely moves
    assert R[1, 1] > 0.4 and R[2, 2] > 0.3  # each session's novel classes from 5 shots (chance: 1/8, 1/10)


def test_the_base_session_trains_a_fixed_scale_cosine_classifier_by_default():
    """CEC's decoupled-cosine baseline (``-base_mode ft_cos -temperature 16``): logits
    ``s * cos(phi(x), w_c)``, no bias, ``s`` fixed; ``base_head: linear`` keeps a linear head.
    (Equality with CEC's training loop: tests/reference/test_fscil.py.)"""
    from clpeft.components.heads.classifiers import CosineHead, LinearHead

    s = _new()
    assert isinstance(s.adapt_head, CosineHead) and not isinstance(s.adapt_head.scale, torch.nn.Parameter)
    s.before_experience(Experience(0, None, None, [0, 1, 2], [0, 1, 2]))
    names = {n for n, p in s.named_parameters() if p.requires_grad and n.startswith("adapt_head")}
    assert names == {"adapt_head.weight"}  # no bias, no trainable scale
    x = torch.randint(0, 256, (4, 1, 8, 8), dtype=torch.uint8)
    features = s.backbone(x)
    expected = 16.0 * torch.nn.functional.normalize(features, dim=1) @ torch.nn.functional.normalize(s.adapt_head.weight, dim=1).T
    torch.testing.assert_close(s.predict(x), expected)
    torch.manual_seed(0)
    linear = strategies.get("fscil_proto")(CNNBackbone((1, 8, 8), widths=[16, 32]), base_head="linear")
    assert isinstance(linear.adapt_head, LinearHead)
