"""AdaNPC and its neighbour memory: the vote worked out by hand, the memory's properties, the
strategy on the digits source model of ``test_tta_methods.py`` (source memory, confident samples
entering, no parameter update, resume) and through the engine on every test-time stream.
"""
# ruff: noqa: F811  (the tests request the imported module fixture ``source`` by name)

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_tta_breadth2 import STREAMS
from test_tta_methods import _adapt, _batches, _make, source  # noqa: F401  (source: that module's fixture)

import clpeft.config
import clpeft.engine
from clpeft.components.tta.neighbour_memory import NeighbourMemory
from clpeft.errors import UserError
from clpeft.experience import Experience
from clpeft.registry import strategies

# ------------------------------------------------------------------ the memory


def _memory(features, labels, **kwargs) -> NeighbourMemory:
    memory = NeighbourMemory(**kwargs)
    memory.add(torch.tensor(features, dtype=torch.float32), torch.tensor(labels))
    return memory


def test_vote_of_a_tiny_memory_worked_out_by_hand():
    """Memory (1,0):0, (0,1):1, (1,1):1, (-1,0):2, query (2,0), k = 2, tau = 0.5: the
    neighbours are (1,0) (cosine 1) and (1,1) (cosine 1/sqrt 2 = 0.707107), weighted
    e^2 = 7.389056 and e^1.414214 = 4.113250: p = (0.642397, 0.357603, 0)."""
    memory = _memory([[1, 0], [0, 1], [1, 1], [-1, 0]], [0, 1, 1, 2], k=2, temperature=0.5)
    p = memory.vote(torch.tensor([[2.0, 0.0]]), 3)
    torch.testing.assert_close(p, torch.tensor([[0.642397, 0.357603, 0.0]]), atol=1e-6, rtol=0)


def test_vote_with_every_entry_and_uniform_weights_is_the_class_frequency():
    """k = memory size and a huge temperature (uniform weights): every query gets the memory's
    class frequencies, so its prediction is the majority class."""
    torch.manual_seed(0)
    labels = torch.tensor([2, 0, 2, 1, 2, 0, 2])
    memory = NeighbourMemory(k=7, temperature=1e9)
    memory.add(torch.randn(7, 5), labels)
    p = memory.vote(torch.randn(4, 5), 3)
    torch.testing.assert_close(p, torch.tensor([[2 / 7, 1 / 7, 4 / 7]]).expand(4, 3))
    assert p.argmax(1).eq(2).all()


def test_nearest_neighbour_vote_is_the_label_of_the_most_similar_entry():
    """k = 1 picks the entry of largest cosine (not Euclidean) similarity."""
    memory = _memory([[10.0, 1.0], [0.1, 0.1]], [0, 1], k=1)
    assert memory.vote(torch.tensor([[1.0, 1.0]]), 2).argmax(1).item() == 1


def test_entries_are_normalised_and_the_capacity_evicts_the_oldest_first():
    memory = _memory([[3, 4], [0, 2]], [0, 1], capacity=3)
    torch.testing.assert_close(memory.features, torch.tensor([[0.6, 0.8], [0.0, 1.0]]))
    memory.add(torch.tensor([[5.0, 0.0], [0.0, -1.0]]), torch.tensor([2, 3]))
    assert len(memory) == 3 and memory.labels.tolist() == [1, 2, 3]
    torch.testing.assert_close(memory.features, torch.tensor([[0.0, 1.0], [1.0, 0.0], [0.0, -1.0]]))


def test_memory_state_dict_round_trip_into_an_empty_memory():
    memory = _memory([[1, 2], [3, 1], [0, 1]], [0, 1, 1], k=2)
    restored = NeighbourMemory(k=2)
    restored.load_state_dict(memory.state_dict())
    x = torch.randn(5, 2)
    assert torch.equal(restored.vote(x, 2), memory.vote(x, 2))


# ------------------------------------------------------------------ the strategy


def _features(strategy, x) -> torch.Tensor:
    with torch.no_grad():
        return strategy.backbone(x)


def test_declares_tta_and_cites_the_paper():
    cls = strategies.get("adanpc")
    assert cls.supported_scenarios == ("test_time_adaptation",)
    assert "Zhang et al. 2023" in cls.__doc__.splitlines()[0]


def test_memory_starts_as_the_source_features_and_labels(source):
    """After the start: one entry per source sample, the normalised source-model features with
    their true labels (as a set: the pass is shuffled)."""
    s = _make("adanpc", source)
    train = source["source_exp"].train
    x, y = train.load()[:2]
    assert len(s.memory) == len(y)
    assert torch.equal(torch.bincount(s.memory.labels, minlength=10), torch.bincount(y, minlength=10))
    expected = F.normalize(_features(s, x), dim=1)
    # as sets (the pass is shuffled, and batch sizes move the last float bits, so no sort key is stable):
    # every expected feature has a stored twin with its label, and every stored feature an expected one
    distance = torch.cdist(expected.double(), s.memory.features.double())
    nearest = distance.argmin(dim=1)
    assert distance.min(dim=1).values.max() < 1e-5 and distance.min(dim=0).values.max() < 1e-5
    assert torch.equal(s.memory.labels[nearest], y)


def test_adapt_returns_the_log_vote_and_confident_samples_enter_the_memory(source):
    """The logits are the log of the k-NN vote over the memory before the batch, written out in
    numpy; exactly the samples whose vote reaches ``beta`` enter, with their predicted labels;
    no parameter changes."""
    s = _make("adanpc", source, threshold=0.8)
    params = {n: p.clone() for n, p in s.named_parameters()}
    bank, labels = s.memory.features.numpy().copy(), s.memory.labels.numpy().copy()
    x = _batches(source, 1)[0]
    z = _features(s, x).numpy()
    out = _adapt(s, x)
    sim = (z / np.linalg.norm(z, axis=1, keepdims=True)) @ bank.T
    expected = np.zeros((len(z), 10))
    for i, row in enumerate(sim):
        top = np.argsort(-row)[:10]
        w = np.exp(row[top] / 0.1)
        np.add.at(expected[i], labels[top], w / w.sum())
    np.testing.assert_allclose(out.exp().numpy(), expected, atol=1e-5)
    confident = expected.max(1) >= 0.8
    assert 0 < confident.sum() < len(x)
    assert len(s.memory) == len(bank) + confident.sum()
    assert s.memory.labels[len(bank) :].tolist() == expected.argmax(1)[confident].tolist()
    np.testing.assert_allclose(s.memory.features[len(bank) :].numpy(), F.normalize(torch.from_numpy(z[confident])).numpy(), atol=1e-6)
    assert all(torch.equal(p, params[n]) for n, p in s.named_parameters())


def test_threshold_above_one_keeps_the_memory_and_zero_adds_every_sample(source):
    x = _batches(source, 1)[0]
    never, always = _make("adanpc", source, threshold=1.5), _make("adanpc", source, threshold=0.0)
    n = len(never.memory)
    _adapt(never, x), _adapt(always, x)
    assert len(never.memory) == n and len(always.memory) == n + len(x)


def test_memory_size_keeps_the_newest_entries(source):
    """With ``memory_size`` the memory never exceeds it; after a batch the test samples are
    its newest entries."""
    s = _make("adanpc", source, memory_size=500, threshold=0.0)
    assert len(s.memory) == 500
    x = _batches(source, 1)[0]
    _adapt(s, x)
    assert len(s.memory) == 500
    torch.testing.assert_close(s.memory.features[-len(x) :], F.normalize(_features(s, x)))


def test_refuses_a_stream_without_source_data(source):
    s = _make("adanpc", source, start=False)
    exp = Experience(1, None, source["tta_exp"].test, [], list(range(10)))
    with pytest.raises(UserError, match="scenario.dataset"):
        s.before_experience(exp)


def test_state_dict_round_trip_continues_identically(source):
    """Saved after two batches, loaded into a fresh strategy (empty memory): the next batches
    give identical predictions and memories."""
    s = _make("adanpc", source, threshold=0.8)
    batches = _batches(source, 4)
    for x in batches[:2]:
        _adapt(s, x)
    restored = _make("adanpc", source, start=False, threshold=0.8)
    restored.load_state_dict(copy.deepcopy(s.state_dict()))
    restored.before_experience(source["tta_exp"])
    for x in batches[2:]:
        assert torch.equal(_adapt(s, x), _adapt(restored, x))
    assert torch.equal(s.memory.features, restored.memory.features) and torch.equal(s.memory.labels, restored.memory.labels)


def test_loading_the_source_state_restarts_from_the_source_memory(source):
    s = _make("adanpc", source, start=False, threshold=0.0)
    source_state = copy.deepcopy(s.state_dict())
    s.before_experience(source["tta_exp"])
    n = len(s.memory)
    _adapt(s, _batches(source, 1)[0])
    s.load_state_dict(source_state)
    assert len(s.memory) == 0
    s.before_experience(source["tta_exp"])
    assert len(s.memory) == n


# ------------------------------------------------------------------ streams


@pytest.mark.parametrize("stream", STREAMS)
def test_runs_every_test_time_stream(stream, tmp_path):
    """Through the engine on a tiny CNN: every domain scored, errors finite and below chance,
    the memory grew past the source features and the parameters stayed the source model's."""
    cfg = {
        "seed": 0,
        "scenario": {
            "name": "test_time_adaptation",
            "dataset": "sklearn_digits",
            "root": str(tmp_path / "data"),
            "severity": 3,
            "train_per_class": 24,
            "test_per_class": 10,
            **STREAMS[stream],
        },
        "backbone": {"name": "cnn", "widths": [8, 16]},
        "strategy": {"name": "adanpc", "threshold": 0.5},
        "train": {"epochs": 5, "batch_size": 16, "lr": 0.01, "optimizer": "adam"},
        "eval": {"batch_size": 128, "baseline": False},
        "logging": {"tensorboard": False, "progress": "never"},
    }
    engine = clpeft.engine.Engine(clpeft.config.resolve(cfg), tmp_path / "run", device="cpu")
    built = engine.build()
    snapshot = {}
    hook = built.strategy.before_experience

    def spied(exp):
        if exp.train is None and not snapshot:
            snapshot.update({n: p.clone() for n, p in built.strategy.named_parameters()})
        hook(exp)

    built.strategy.before_experience = spied
    errors = engine.run(built)["metrics"]["error_per_domain"]
    domains = {"continual": 2, "gradual": 9, "mixed": 4, "dirichlet": 2}[stream]
    assert len(errors) == domains and np.all(np.isfinite(errors)) and np.mean(errors) < 0.8, errors
    assert len(built.strategy.memory) > 240
    assert all(torch.equal(p, snapshot[n]) for n, p in built.strategy.named_parameters())
