"""Tests for ``clpeft.scenarios.class_incremental`` on scikit-learn's bundled digits.

Independent reference: the raw digits split from ``datasets.load_dataset`` (original labels);
every experience sample is traced back through its dataset index to its original class.
"""

from __future__ import annotations

import copy
from collections import Counter

import numpy as np
import pytest

import clpeft.config
from clpeft.errors import UserError
from clpeft.scenarios import datasets
from clpeft.scenarios.class_incremental import ClassIncremental


@pytest.fixture(scope="module")
def raw():
    """(train, test) ArrayDatasets with the original digit labels."""
    return datasets.load_dataset("sklearn_digits", ".")


def _make(tmp_path, **kw):
    params = dict(seed=0, dataset="sklearn_digits", n_experiences=5, root=str(tmp_path))
    params.update(kw)
    return ClassIncremental(**params)


def _original_labels(view, raw_split) -> np.ndarray:
    """Original class of every sample of ``view`` (looked up by dataset index)."""
    return np.concatenate([raw_split.targets[idx].numpy() for _, idx in view.parts])


def _indices(view) -> list[int]:
    return [i for _, idx in view.parts for i in idx.tolist()]


def test_sklearn_digits_split_sizes(raw):
    train, test = raw
    assert len(train) + len(test) == 1797
    assert len(test) == 540  # train_test_split rounds the 30% test share up: ceil(539.1)
    assert tuple(train.inputs.shape[1:]) == (1, 8, 8)
    assert train.inputs.dtype.is_floating_point is False and int(train.inputs.max()) <= 255


def test_natural_order_disjoint_contiguous_and_complete(tmp_path, raw):
    scn = _make(tmp_path)
    exps = scn.experiences()
    assert [e.index for e in exps] == list(range(5))
    assert scn.input_shape == (1, 8, 8)
    covered = []
    for i, e in enumerate(exps):
        assert e.classes_in_this_experience == [2 * i, 2 * i + 1]
        assert e.classes_seen_so_far == list(range(2 * i + 2))
        assert e.n_classes_seen == 2 * i + 2
        for view, split in ((e.train, raw[0]), (e.test, raw[1])):
            assert set(view.targets.tolist()) == set(e.classes_in_this_experience)
            # natural order: new label == original label
            assert np.array_equal(_original_labels(view, split), view.targets.numpy())
        covered += _indices(e.train)
    # no subsampling: the experiences partition the whole training set
    assert sorted(covered) == list(range(len(raw[0])))
    assert sum(len(e.test) for e in exps) == len(raw[1])


@pytest.mark.parametrize("order", [[3, 1, 7, 0, 9, 2, 8, 4, 6, 5], 1993, 7])
def test_class_order_relabels_in_stream_order(tmp_path, raw, order):
    scn = _make(tmp_path, class_order=order)
    exps = scn.experiences()
    if isinstance(order, list):
        perm = np.asarray(order)
    else:
        # recover the permutation from the data itself: new label -> original class
        perm = np.full(10, -1)
        for e in exps:
            for new, orig in zip(e.train.targets.numpy(), _original_labels(e.train, raw[0])):
                assert perm[new] in (-1, orig)
                perm[new] = orig
        assert sorted(perm.tolist()) == list(range(10))
        assert perm.tolist() != list(range(10))  # a seed gives a non-trivial order
    seen = []
    for i, e in enumerate(exps):
        # experience i holds the original classes perm[2i], perm[2i+1], relabelled to 2i, 2i+1
        assert e.classes_in_this_experience == [2 * i, 2 * i + 1]
        for view, split in ((e.train, raw[0]), (e.test, raw[1])):
            orig = _original_labels(view, split)
            assert set(orig.tolist()) == {perm[2 * i], perm[2 * i + 1]}
            assert np.array_equal(perm[view.targets.numpy()], orig)
        seen += list(perm[2 * i : 2 * i + 2])
        assert len(set(seen)) == len(seen)
    assert scn.class_names == [str(c) for c in perm]
    # the relabelled datasets share the raw images
    ((ds, idx),) = exps[0].train.parts
    assert np.array_equal(ds.inputs[idx].numpy(), raw[0].inputs[idx].numpy())


def test_integer_class_order_is_deterministic_and_seed_dependent(tmp_path):
    def order_of(seed):
        exps = _make(tmp_path, class_order=seed).experiences()
        return exps[0].train.parts[0][0].class_names

    assert order_of(1993) == order_of(1993)
    assert order_of(1993) != order_of(1994)


def test_init_classes_b_style_split(tmp_path):
    exps = _make(tmp_path, n_experiences=4, init_classes=4).experiences()
    assert [e.classes_in_this_experience for e in exps] == [[0, 1, 2, 3], [4, 5], [6, 7], [8, 9]]
    assert [e.classes_seen_so_far for e in exps] == [list(range(4)), list(range(6)), list(range(8)), list(range(10))]
    for e in exps:
        assert set(e.train.targets.tolist()) == set(e.classes_in_this_experience)
    assert ClassIncremental.group_sizes(100, 6, 50) == [50, 10, 10, 10, 10, 10]
    assert ClassIncremental.group_sizes(100, 10, None) == [10] * 10
    assert ClassIncremental.group_sizes(10, 1, 10) == [10]


def test_per_class_counts_are_exact(tmp_path, raw):
    exps = _make(tmp_path, train_per_class=7, test_per_class=3).experiences()
    for e in exps:
        assert Counter(e.train.targets.tolist()) == {c: 7 for c in e.classes_in_this_experience}
        assert Counter(e.test.targets.tolist()) == {c: 3 for c in e.classes_in_this_experience}
        assert len(set(_indices(e.train))) == len(e.train)  # no duplicates
    # more than a class has: all of it
    exps = _make(tmp_path, train_per_class=10_000).experiences()
    assert sum(len(e.train) for e in exps) == len(raw[0])


def test_same_seed_same_indices_different_seed_different_indices(tmp_path):
    def indices(seed):
        exps = _make(tmp_path, seed=seed, train_per_class=5, test_per_class=5).experiences()
        return [(_indices(e.train), _indices(e.test)) for e in exps]

    a, b, c = indices(0), indices(0), indices(1)
    assert a == b
    assert a != c
    for (tr_a, te_a), (tr_c, te_c) in zip(a, c):
        assert tr_a != tr_c and te_a != te_c


def test_past_links_every_earlier_experience(tmp_path):
    exps = _make(tmp_path).experiences()
    for i, e in enumerate(exps):
        assert len(e.past) == i
        assert all(p is q for p, q in zip(e.past, exps[:i]))


def test_experience_train_and_test_are_disjoint_sample_sets(tmp_path):
    exps = _make(tmp_path).experiences()
    train_ds, test_ds = exps[0].train.parts[0][0], exps[0].test.parts[0][0]
    assert train_ds.name == "sklearn_digits/train" and test_ds.name == "sklearn_digits/test"
    assert train_ds.fingerprint != test_ds.fingerprint


# --------------------------------------------------------------------------------------------
# configuration errors name the key
# --------------------------------------------------------------------------------------------


BASE = {
    "seed": 0,
    "scenario": {"name": "class_incremental", "dataset": "sklearn_digits", "n_experiences": 5},
    "backbone": {"name": "mlp"},
    "strategy": {"name": "finetune"},
}


def _resolve(**scenario):
    cfg = copy.deepcopy(BASE)
    cfg["scenario"].update(scenario)
    cfg["scenario"] = {k: v for k, v in cfg["scenario"].items() if v is not _DROP}
    return clpeft.config.resolve(cfg)


_DROP = object()


def test_valid_config_resolves():
    cfg = _resolve(init_classes=4, n_experiences=4, class_order=1993)
    assert cfg.scenario.cls is ClassIncremental
    assert cfg.scenario.params["init_classes"] == 4


@pytest.mark.parametrize(
    "scenario, key, fragment",
    [
        ({"n_experiences": 3}, "scenario.n_experiences", "equal experiences"),
        ({"n_experiences": 0}, "scenario.n_experiences", "at least 1"),
        ({"n_experiences": 11}, "scenario.n_experiences", "only 10 classes"),
        ({"class_order": [0, 1, 2]}, "scenario.class_order", "permutation"),
        ({"class_order": [0, 0, 1, 2, 3, 4, 5, 6, 7, 8]}, "scenario.class_order", "permutation"),
        ({"n_experiences": 3, "init_classes": 5}, "scenario.init_classes", "do not split"),
        ({"n_experiences": 2, "init_classes": 10}, "scenario.init_classes", ""),
        ({"init_classes": 0}, "scenario.init_classes", "between 1 and 10"),
        ({"init_classes": 11}, "scenario.init_classes", "between 1 and 10"),
        ({"train_per_class": 0}, "scenario.train_per_class", "greater than or equal to 1, got 0"),
        ({"n_experiences": _DROP}, "scenario.n_experiences", "missing"),
        ({"n_experience": 5}, "scenario.n_experience", "n_experiences"),
    ],
)
def test_config_errors_name_the_key(scenario, key, fragment):
    with pytest.raises(UserError) as info:
        _resolve(**scenario)
    msg = str(info.value)
    assert msg.startswith(key + ":") or f" {key}:" in msg, msg
    assert fragment in msg


def test_wrong_type_names_the_exact_key_path():
    """``class_order: list[int] | int | None``: a string is wrong for every member of the union.
    The message must start with the key path itself, not a pydantic union tag such as
    ``scenario.class_order.list[int]`` (which is not a key the user can write)."""
    with pytest.raises(UserError) as info:
        _resolve(class_order="shuffled")
    msg = str(info.value)
    assert msg.startswith("scenario.class_order:"), msg
    assert "'shuffled'" in msg


def test_unknown_dataset_suggests_the_closest_spelling():
    with pytest.raises(UserError) as info:
        _resolve(dataset="sklearn_digit")
    assert info.value.key == "scenario.dataset"
    assert "did you mean 'sklearn_digits'" in str(info.value)


def test_check_config_directly():
    params = dict(dataset="sklearn_digits", n_experiences=4, init_classes=None, class_order=None)
    with pytest.raises(UserError) as info:
        ClassIncremental.check_config(params)
    assert info.value.key == "scenario.n_experiences"
    with pytest.raises(UserError) as info:
        ClassIncremental.check_config({**params, "init_classes": 3})
    assert info.value.key == "scenario.init_classes"
    ClassIncremental.check_config({**params, "init_classes": 4})  # 4 + 3 * 2 = 10: valid
    with pytest.raises(UserError) as info:
        ClassIncremental(seed=0, dataset="fashoin_mnist", n_experiences=5)
    assert info.value.key == "scenario.dataset" and "'fashion_mnist'" in str(info.value)


def test_missing_fashion_mnist_says_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets, "DEBIAN_FASHION_MNIST", tmp_path / "not-installed")
    with pytest.raises(UserError, match=r"scenario.dataset: FashionMNIST not found under .*apt-get install dataset-fashion-mnist"):
        datasets.load_dataset("fashion_mnist", tmp_path / "empty-root")


def test_class_order_random_follows_the_runs_seed():
    """``class_order: random``: PyCIL's ``np.random.seed(seed); permutation(C)`` with the run's seed (one order per seed)."""
    import numpy as np

    from clpeft.scenarios.class_incremental import ClassIncremental

    def order(seed, class_order):  # the digits in the order the stream presents them (ids are relabelled 0..9)
        scenario = ClassIncremental(seed=seed, dataset="sklearn_digits", n_experiences=5, class_order=class_order)
        scenario.experiences()
        return [int(name) for name in scenario.class_names]

    orders = {seed: order(seed, "random") for seed in (0, 1, 1993)}
    for seed, got in orders.items():
        np.random.seed(seed)
        assert got == np.random.permutation(10).tolist()
    assert len({tuple(o) for o in orders.values()}) == 3
    assert order(5, 1993) == orders[1993]  # an integer still fixes the order whatever the run's seed
