"""The Dirichlet label-shift stream of ``test_time_adaptation`` (``scenario.label_shift: dirichlet``).

Checked: the ordering is a permutation of each domain's samples whose labels come in runs
(fewer label changes than an i.i.d. order, more at a larger concentration), every domain and the
mixed stream get one, a stream too short for the reference's chunks is refused in one line, and
the default leaves the stream as it was. Equality with the benchmark's sampling is in
``tests/reference/test_tta_breadth.py``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from clpeft import config
from clpeft.errors import UserError
from clpeft.scenarios.label_shift import dirichlet_order
from clpeft.scenarios.test_time_adaptation import TestTimeAdaptation as TTAScenario  # not a pytest class


def _scenario(**kw):
    params = {"dataset": "sklearn_digits", "corruptions": ["gaussian_noise", "fog"], "test_per_class": 15, **kw}
    return TTAScenario(seed=0, **params)


def _changes(labels) -> int:
    labels = np.asarray(labels)
    return int((labels[1:] != labels[:-1]).sum())


def test_dirichlet_order_is_a_permutation_with_runs_of_one_label():
    labels = np.repeat(np.arange(10), 100)
    np.random.default_rng(0).shuffle(labels)
    changes = {}
    for delta in (0.01, 0.1, 1.0, 100.0):
        order = dirichlet_order(labels, delta, np.random.RandomState(0))
        assert sorted(order.tolist()) == list(range(1000))
        changes[delta] = _changes(labels[order])
    assert changes[0.01] < changes[0.1] < changes[1.0] < changes[100.0] <= 200  # iid order: ~900 changes
    assert _changes(labels) > 800


def test_each_domain_gets_its_own_dirichlet_order_of_the_same_images():
    plain = _scenario().experiences()
    shifted = _scenario(label_shift="dirichlet", dirichlet_concentration=0.1).experiences()
    for before, after in zip(plain, shifted):
        (_, idx_a), (_, idx_b) = before.test.parts[0], after.test.parts[0]
        assert sorted(idx_a.tolist()) == sorted(idx_b.tolist()) and not torch.equal(idx_a, idx_b)
        assert _changes(after.test.targets) < _changes(before.test.targets) // 3
    assert not torch.equal(shifted[0].test.parts[0][1], shifted[1].test.parts[0][1])
    first = int(shifted[1].test.parts[0][1][0])  # the same corrupted image as in the unshifted stream
    position = int((plain[1].test.parts[0][1] == first).nonzero())
    assert torch.equal(shifted[1].test.load([0])[0], plain[1].test.load([position])[0])


def test_mixed_mode_orders_the_mixture_by_dirichlet():
    mixed = _scenario(mode="mixed", chunk_size=100, label_shift="dirichlet").experiences()
    iid = _scenario(mode="mixed", chunk_size=100).experiences()
    labels = torch.cat([e.test.targets for e in mixed])
    assert sorted(labels.tolist()) == sorted(torch.cat([e.test.targets for e in iid]).tolist())
    assert _changes(labels) < _changes(torch.cat([e.test.targets for e in iid])) // 3


def test_too_short_a_stream_is_refused_and_the_default_is_unchanged():
    with pytest.raises(UserError, match="at least 10 test samples per class"):
        _scenario(test_per_class=5, label_shift="dirichlet").experiences()
    spec = config.resolve(
        {
            "scenario": {"name": "test_time_adaptation", "dataset": "sklearn_digits"},
            "backbone": {"name": "cnn"},
            "strategy": {"name": "tent"},
        }
    ).scenario
    assert spec.params.get("label_shift", "none") == "none"
    assert [e.test.parts[0][1].tolist() for e in _scenario(label_shift="none").experiences()] == [
        e.test.parts[0][1].tolist() for e in _scenario().experiences()
    ]
    with pytest.raises(UserError, match="dirichlet_concentration"):
        config.resolve(
            {
                "scenario": {
                    "name": "test_time_adaptation",
                    "dataset": "sklearn_digits",
                    "label_shift": "dirichlet",
                    "dirichlet_concentration": 0,
                },
                "backbone": {"name": "cnn"},
                "strategy": {"name": "tent"},
            }
        )
