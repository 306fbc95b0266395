"""Few-shot class-incremental streams: exact shots, disjoint sessions, a replayable plan."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from clpeft import config
from clpeft.errors import UserError
from clpeft.scenarios.datasets import load_dataset
from clpeft.scenarios.few_shot_class_incremental import SESSIONS_FILE, FewShotClassIncremental

DIGITS = {"dataset": "sklearn_digits", "n_base": 4, "n_way": 2, "k_shot": 5}


def _indices(exp) -> np.ndarray:
    ((ds, idx),) = exp.train.parts
    return idx.numpy()


@pytest.mark.parametrize("class_order", [None, 1993])
def test_every_session_has_exactly_k_shots_of_its_new_classes_and_no_overlap(class_order):
    scenario = FewShotClassIncremental(seed=3, class_order=class_order, **DIGITS)
    stream = scenario.experiences()
    train, test = load_dataset("sklearn_digits", "~/.cache/clpeft/data")
    assert len(stream) == 4  # 4 base classes + 3 sessions of 2 ways
    base = stream[0]
    assert base.classes_in_this_experience == [0, 1, 2, 3] and base.n_way == 4 and base.k_shot is None
    order = scenario.plan["class_order"]
    originals = train.targets.numpy()[_indices(base)]
    assert len(_indices(base)) == int(np.isin(train.targets.numpy(), order[:4]).sum())  # all their data
    assert set(originals) == set(order[:4])
    seen_indices = set(_indices(base))
    for s, exp in enumerate(stream[1:], start=1):
        new = list(range(4 + 2 * (s - 1), 4 + 2 * s))
        assert exp.classes_in_this_experience == new and exp.classes_seen_so_far == list(range(4 + 2 * s))
        assert (exp.n_way, exp.k_shot) == (2, 5)
        assert np.bincount(exp.train.targets.numpy(), minlength=10)[new].tolist() == [5, 5]
        assert len(exp.train) == 10
        assert seen_indices.isdisjoint(_indices(exp))
        seen_indices |= set(_indices(exp))
        # the test data of a session: every test sample of its classes
        assert len(exp.test) == int(np.isin(test.targets.numpy(), order[4 + 2 * (s - 1) : 4 + 2 * s]).sum())
    assert [c for e in stream for c in e.classes_in_this_experience] == list(range(10))


def test_the_saved_plan_reproduces_the_stream_under_any_seed(tmp_path):
    first = FewShotClassIncremental(seed=3, test_per_class=20, **DIGITS)
    stream = first.experiences()
    first.save_artifacts(tmp_path)
    plan = json.loads((tmp_path / SESSIONS_FILE).read_text())
    assert [len(s["train_indices"]) for s in plan["sessions"][1:]] == [10, 10, 10]

    other_seed = FewShotClassIncremental(seed=99, **DIGITS).experiences()
    assert any(not np.array_equal(_indices(a), _indices(b)) for a, b in zip(stream[1:], other_seed[1:]))

    replay = FewShotClassIncremental(seed=99, sessions_file=str(tmp_path / SESSIONS_FILE), **DIGITS).experiences()
    for a, b in zip(stream, replay):
        assert np.array_equal(_indices(a), _indices(b))
        assert torch.equal(a.test.parts[0][1], b.test.parts[0][1])
        assert torch.equal(a.train.targets, b.train.targets)

    with pytest.raises(UserError, match="sessions of \\[2, 2, 2\\] classes x \\[5, 5, 5\\] shots"):
        FewShotClassIncremental(seed=0, sessions_file=str(tmp_path / SESSIONS_FILE), **{**DIGITS, "k_shot": 1}).experiences()
    plan["sessions"][1]["train_indices"][0] = plan["sessions"][0]["train_indices"][0]  # a base-class sample
    (tmp_path / "bad.json").write_text(json.dumps(plan))
    with pytest.raises(UserError, match="indices of session 1 do not match"):
        FewShotClassIncremental(seed=0, sessions_file=str(tmp_path / "bad.json"), **DIGITS).experiences()


def test_base_per_class_and_n_sessions_limit_the_stream():
    stream = FewShotClassIncremental(seed=0, base_per_class=7, n_sessions=2, **DIGITS).experiences()
    assert len(stream) == 3 and len(stream[0].train) == 28
    assert stream[-1].classes_seen_so_far == list(range(8))


@pytest.mark.parametrize(
    "scenario,message",
    [
        ({"n_base": 11}, "scenario.n_base: the dataset has only 10 classes"),
        ({"n_sessions": 4}, "scenario.n_sessions: 4 base \\+ 4 x 2 classes exceed the 10 classes"),
        ({"k_shot": 0}, "scenario.k_shot"),
    ],
)
def test_config_mistakes_name_the_key(scenario, message):
    cfg = {
        "scenario": {"name": "few_shot_class_incremental", **DIGITS, **scenario},
        "backbone": {"name": "mlp"},
        "strategy": {"name": "finetune"},
    }
    with pytest.raises(UserError, match=message):
        config.resolve(cfg)


# ------------------------------------------------------------------ session_lists: cec | random
# (equality with CEC's lists and loaders: tests/reference/test_fscil.py)

CIFAR = {"dataset": "cifar100", "n_base": 60, "n_way": 5, "k_shot": 5}


def test_session_lists_default_to_cec_where_cec_has_lists_and_random_elsewhere():
    assert FewShotClassIncremental(seed=0, **DIGITS).session_lists == "random"
    for dataset, shape in (("cifar100", (60, 5, 5)), ("mini_imagenet", (60, 5, 5)), ("cub200", (100, 10, 5))):
        scenario = FewShotClassIncremental(seed=0, dataset=dataset, **dict(zip(("n_base", "n_way", "k_shot"), shape)))
        assert scenario.session_lists == "cec"
    assert FewShotClassIncremental(seed=0, session_lists="random", **CIFAR).session_lists == "random"
    # a sessions file is replayed as it is
    assert FewShotClassIncremental(seed=0, sessions_file="plan.json", **CIFAR).session_lists == "random"


def test_cec_lists_on_another_dataset_name_the_option():
    with pytest.raises(UserError, match="scenario.session_lists") as info:
        FewShotClassIncremental(seed=0, session_lists="cec", **DIGITS)
    assert "cifar100, mini_imagenet, cub200 only" in str(info.value) and "session_lists: random" in str(info.value)


@pytest.mark.parametrize(
    "change, key",
    [
        ({"n_base": 50}, "n_base"),
        ({"n_way": 10}, "n_way"),
        ({"k_shot": 1}, "k_shot"),
        ({"class_order": 1993}, "class_order"),
        ({"base_per_class": 100}, "base_per_class"),
        ({"test_per_class": 10}, "test_per_class"),
    ],
)
def test_settings_the_cec_lists_fix_are_refused_with_them_and_taken_when_drawing(change, key):
    with pytest.raises(UserError, match=f"scenario.{key}") as info:
        FewShotClassIncremental(seed=0, **{**CIFAR, **change})
    assert "set session_lists: random" in str(info.value)
    FewShotClassIncremental(seed=0, session_lists="random", **{**CIFAR, **change})


def test_the_yaml_config_reports_a_cec_conflict_in_one_line():
    cfg = {
        "scenario": {"name": "few_shot_class_incremental", **CIFAR, "n_base": 50},
        "backbone": {"name": "mlp"},
        "strategy": {"name": "fscil_proto"},
    }
    with pytest.raises(UserError, match="scenario.n_base") as info:
        config.resolve(cfg)
    assert "\n" not in str(info.value)
