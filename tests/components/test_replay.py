"""Tests for ``clpeft.components.memory.replay.ReplayBuffer``.

The buffer stores ``(experience index, position)`` rows; these tests build small synthetic
streams whose inputs encode a global sample id (``x[i] == i``), so what the buffer hands back
can be traced to the exact samples offered.
"""

from __future__ import annotations

import io
import itertools
import math
from collections import Counter

import numpy as np
import pytest
import torch
from torch import nn

from clpeft.components.memory.replay import ReplayBuffer, herding_order
from clpeft.data import ArrayDataset, DataView
from clpeft.experience import Experience, Scenario


def _stream(sizes, labels_of=None, seed=0):
    """Experiences over one dataset whose input ``i`` is the integer ``i``.

    ``labels_of(k, n)`` gives the labels of experience ``k``; default: all ``k``. Experience
    ``k``'s train view takes its dataset indices in a shuffled order, so a position in the view
    differs from the dataset index.
    """
    labels_of = labels_of or (lambda k, n: [k] * n)
    labels = torch.cat([torch.as_tensor(labels_of(k, n), dtype=torch.long) for k, n in enumerate(sizes)])
    ds = ArrayDataset(torch.arange(len(labels)), labels, "synthetic")
    rng = np.random.default_rng(seed)
    exps, start = [], 0
    for k, n in enumerate(sizes):
        idx = start + rng.permutation(n)
        classes = sorted(set(labels[start : start + n].tolist()))
        exps.append(Experience(k, DataView.of(ds, idx), None, classes, []))
        start += n
    return Scenario.link(exps), ds


def _global_ids(buffer: ReplayBuffer, exps) -> list[int]:
    """Dataset index of every stored row, looked up in the index lists ``_stream`` built."""
    flat = torch.cat([e.train.parts[0][1] for e in exps])
    offsets = torch.tensor([0, *np.cumsum([len(e.train) for e in exps])])
    return flat[offsets[buffer.items[:, 0]] + buffer.items[:, 1]].tolist()


# --------------------------------------------------------------------------------------------
# capacity and bookkeeping
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("policy", ["reservoir", "class_balanced"])
@pytest.mark.parametrize("capacity", [0, 1, 7, 25, 1000])
def test_capacity_never_exceeded(policy, capacity):
    exps, _ = _stream([5, 13, 2, 30], labels_of=lambda k, n: [(3 * k + i) % 5 for i in range(n)])
    buf = ReplayBuffer(capacity, policy)
    g = torch.Generator().manual_seed(0)
    seen = 0
    for e in exps:
        buf.update(e, g)
        seen += len(e.train)
        assert len(buf) <= capacity
        assert buf.n_seen == seen
        assert buf.items.shape == (len(buf), 2) and buf.labels.shape == (len(buf),)
        if policy == "reservoir":
            assert len(buf) == min(capacity, seen)


@pytest.mark.parametrize("policy", ["reservoir", "class_balanced"])
def test_stored_labels_are_the_labels_of_the_stored_samples(policy):
    exps, ds = _stream([20, 20, 20], labels_of=lambda k, n: [2 * k + i % 2 for i in range(n)])
    buf = ReplayBuffer(12, policy)
    g = torch.Generator().manual_seed(3)
    for e in exps:
        buf.update(e, g)
        ids = _global_ids(buf, exps)
        assert buf.labels.tolist() == ds.targets[ids].tolist()
        assert len(set(ids)) == len(ids)  # no sample stored twice


def test_invalid_arguments():
    with pytest.raises(ValueError):
        ReplayBuffer(-1)
    with pytest.raises(ValueError):
        ReplayBuffer(10, "herding_typo")


# --------------------------------------------------------------------------------------------
# reservoir sampling: P(sample i is stored) = capacity / n_seen for every position i
# --------------------------------------------------------------------------------------------


def test_reservoir_inclusion_probability_is_uniform_over_stream_positions():
    """Monte Carlo over R independent generators.

    The inclusion indicator of one position is Bernoulli(p); its frequency over R trials has
    standard deviation sqrt(p(1-p)/R) <= 0.0112 for R = 1500. We check ~60 (position,
    time) pairs at 4.5 sigma each: a correct sampler fails one of them with probability below
    60 * 6.8e-6 = 4e-4 (union bound), and with fixed seeds the outcome is deterministic anyway.
    The check right after the first experience (8 samples, capacity 6) is where off-by-one
    bugs are largest: drawing ``j`` from ``randint(n_seen + 1)`` or ``randint(n_seen - 1)``
    moves some frequency by 0.10-0.12, twice the 0.050 tolerance (both mutants were run
    against this test and fail it); keeping the first ``capacity`` samples gives 1 and 0.
    """
    sizes, capacity, R = [8, 12, 10], 6, 1500
    exps, _ = _stream(sizes)
    counts = [np.zeros(sum(sizes[: k + 1])) for k in range(len(sizes))]
    for r in range(R):
        buf = ReplayBuffer(capacity, "reservoir")
        g = torch.Generator().manual_seed(1000 + r)
        for k, e in enumerate(exps):
            buf.update(e, g)
            # stream position of a row = samples before its experience + its position
            offsets = np.cumsum([0, *sizes])[buf.items[:, 0].numpy()]
            counts[k][offsets + buf.items[:, 1].numpy()] += 1
    for k, c in enumerate(counts):
        n_seen = len(c)
        p = min(1.0, capacity / n_seen)
        freq = c / R
        tol = 4.5 * math.sqrt(p * (1 - p) / R) + 1e-12
        worst = np.abs(freq - p).max()
        assert worst <= tol, f"after experience {k}: max |freq - {p:.3f}| = {worst:.4f} > {tol:.4f}"
        # the buffer is always full once n_seen >= capacity, so the frequencies sum to capacity
        assert c.sum() == R * min(capacity, n_seen)


def test_reservoir_subsets_are_uniform():
    """Stronger than marginals: every 2-subset of 5 samples is equally likely (prob 1/10).

    Pearson chi-square with 9 degrees of freedom; 27.88 is its 0.999 quantile.
    """
    exps, _ = _stream([2, 3])
    R = 2000
    counts = Counter()
    for r in range(R):
        buf = ReplayBuffer(2, "reservoir")
        g = torch.Generator().manual_seed(r)
        for e in exps:
            buf.update(e, g)
        counts[frozenset(_global_ids(buf, exps))] += 1
    subsets = [frozenset(s) for s in itertools.combinations(range(5), 2)]
    assert set(counts) <= set(subsets)
    expected = R / len(subsets)
    chi2 = sum((counts[s] - expected) ** 2 / expected for s in subsets)
    assert chi2 < 27.88, f"chi2 = {chi2:.1f}, counts = {dict(counts)}"


def test_reservoir_is_deterministic_given_the_generator():
    exps, _ = _stream([30, 30])
    a, b = ReplayBuffer(10), ReplayBuffer(10)
    ga, gb = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    for e in exps:
        a.update(e, ga)
        b.update(e, gb)
    assert torch.equal(a.items, b.items) and torch.equal(a.labels, b.labels)
    c = ReplayBuffer(10)
    gc = torch.Generator().manual_seed(6)
    for e in exps:
        c.update(e, gc)
    assert not torch.equal(a.items, c.items)


# --------------------------------------------------------------------------------------------
# class-balanced memory
# --------------------------------------------------------------------------------------------


def _per_class(buf: ReplayBuffer) -> dict[int, int]:
    return dict(Counter(buf.labels.tolist()))


def test_class_balanced_equal_shares_and_rebalance_when_classes_arrive():
    # experience k holds classes 2k, 2k+1 with 30 samples each
    exps, ds = _stream([60, 60, 60], labels_of=lambda k, n: [2 * k + i % 2 for i in range(n)])
    buf = ReplayBuffer(24, "class_balanced")
    g = torch.Generator().manual_seed(0)
    history = []
    for k, e in enumerate(exps):
        buf.update(e, g)
        counts = _per_class(buf)
        assert set(counts) == set(range(2 * k + 2))  # every class seen so far is represented
        assert max(counts.values()) - min(counts.values()) <= 1
        assert len(buf) == 24  # 24 divides evenly by 2, 4 and 6 classes
        history.append({c: set(np.array(_global_ids(buf, exps))[buf.labels.numpy() == c].tolist()) for c in counts})
    assert _per_class(buf) == {c: 4 for c in range(6)}
    # re-balancing only shrinks old classes: the kept samples of an old class are a subset of
    # the ones it had before (the old data is gone, nothing else could be stored)
    for before, after in zip(history, history[1:]):
        for c, ids in before.items():
            assert after[c] <= ids
            assert len(after[c]) < len(ids)


def test_class_balanced_takes_everything_from_a_small_class():
    # class 0 has only 3 samples, class 1 has 40: class 0 keeps all 3 and class 1 gets its share
    exps, _ = _stream([43], labels_of=lambda k, n: [0, 0, 0] + [1] * 40)
    buf = ReplayBuffer(20, "class_balanced")
    buf.update(exps[0], torch.Generator().manual_seed(0))
    assert _per_class(buf) == {0: 3, 1: 10}


def test_class_balanced_fills_capacity_when_it_does_not_divide_evenly():
    """Shares differ by at most one and use the whole capacity (as Avalanche's
    ClassBalancedBuffer, which hands the remainder ``capacity % n_classes`` out one by one)."""
    exps, _ = _stream([90], labels_of=lambda k, n: [i % 3 for i in range(n)])
    buf = ReplayBuffer(10, "class_balanced")
    buf.update(exps[0], torch.Generator().manual_seed(0))
    counts = _per_class(buf)
    assert max(counts.values()) - min(counts.values()) <= 1
    assert len(buf) == 10, f"stored {len(buf)} of capacity 10 with 3 classes: {counts}"


def test_class_balanced_with_more_classes_than_capacity_still_stores_samples():
    """5 classes, capacity 3: a share of 3 // 5 = 0 per class must not leave the memory empty."""
    exps, _ = _stream([50], labels_of=lambda k, n: [i % 5 for i in range(n)])
    buf = ReplayBuffer(3, "class_balanced")
    buf.update(exps[0], torch.Generator().manual_seed(0))
    assert len(buf) == 3
    assert max(_per_class(buf).values()) == 1


def test_class_balanced_samples_a_uniform_subset_of_each_class():
    # 10 samples of one class, capacity 2 -> each sample kept with probability 1/5
    exps, _ = _stream([10])
    R = 1000
    counts = np.zeros(10)
    for r in range(R):
        buf = ReplayBuffer(2, "class_balanced")
        buf.update(exps[0], torch.Generator().manual_seed(r))
        counts[_global_ids(buf, exps)] += 1
    # sd of each frequency = sqrt(0.2 * 0.8 / 1000) = 0.0126; 4.5 sigma per position
    assert np.abs(counts / R - 0.2).max() < 4.5 * math.sqrt(0.16 / R)


# --------------------------------------------------------------------------------------------
# view(): the stored samples as data
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("policy", ["reservoir", "class_balanced"])
def test_view_returns_exactly_the_stored_samples(policy):
    exps, ds = _stream([17, 23, 11], labels_of=lambda k, n: [(k * 7 + i) % 4 for i in range(n)])
    buf = ReplayBuffer(15, policy)
    g = torch.Generator().manual_seed(11)
    for e in exps:
        buf.update(e, g)
    assert {e for e, _ in buf.items.tolist()} == {0, 1, 2}  # rows from every experience
    view = buf.view(exps[-1].past + (exps[-1],))
    x, y = view.load()
    assert len(view) == len(buf)
    # same multiset of (sample, label) pairs as the buffer's rows and labels
    stored = Counter(zip(_global_ids(buf, exps), buf.labels.tolist()))
    assert Counter(zip(x.tolist(), y.tolist())) == stored
    # the view's labels are the dataset's labels of those samples
    assert y.tolist() == ds.targets[x].tolist()
    assert view.targets.tolist() == y.tolist()


def test_view_of_empty_buffer_is_empty():
    exps, _ = _stream([5])
    buf = ReplayBuffer(4)
    view = buf.view(exps)
    assert len(view) == 0 and view.targets.numel() == 0


# --------------------------------------------------------------------------------------------
# state: travels in the state_dict of the module that holds the buffer
# --------------------------------------------------------------------------------------------


class _Holder(nn.Module):
    def __init__(self, capacity, policy):
        super().__init__()
        self.lin = nn.Linear(2, 2)
        self.buffer = ReplayBuffer(capacity, policy)


@pytest.mark.parametrize("policy", ["reservoir", "class_balanced"])
def test_state_round_trip_and_identical_continuation(policy):
    exps, _ = _stream([20, 20, 20], labels_of=lambda k, n: [2 * k + i % 2 for i in range(n)])
    src = _Holder(9, policy)
    g = torch.Generator().manual_seed(0)
    for e in exps[:2]:
        src.buffer.update(e, g)

    blob = io.BytesIO()
    torch.save(src.state_dict(), blob)
    blob.seek(0)
    dst = _Holder(9, policy)
    dst.load_state_dict(torch.load(blob, weights_only=False))

    assert torch.equal(dst.buffer.items, src.buffer.items)
    assert torch.equal(dst.buffer.labels, src.buffer.labels)
    assert dst.buffer.n_seen == src.buffer.n_seen == 40
    # resuming with the same random state gives the same memory as never stopping
    g_src, g_dst = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    src.buffer.update(exps[2], g_src)
    dst.buffer.update(exps[2], g_dst)
    assert torch.equal(dst.buffer.items, src.buffer.items)
    assert torch.equal(dst.buffer.labels, src.buffer.labels)
    assert dst.buffer.n_seen == 60


def test_state_dict_of_a_later_update_does_not_change_an_earlier_snapshot():
    exps, _ = _stream([10, 10])
    holder = _Holder(4, "reservoir")
    holder.buffer.update(exps[0], torch.Generator().manual_seed(0))
    snap = holder.state_dict()
    items = snap["buffer._extra_state"]["items"].clone()
    holder.buffer.update(exps[1], torch.Generator().manual_seed(1))
    assert torch.equal(snap["buffer._extra_state"]["items"], items)
    assert snap["buffer._extra_state"]["n_seen"] == 10


# --------------------------------------------------------------------------------------------
# herding (iCaRL): m = capacity // classes per class, chosen on features, old classes cut to a prefix
# (equality with LAMDA-PILOT's and Mammoth's herding: tests/reference/test_herding.py)
# --------------------------------------------------------------------------------------------


def _features_of(exp, table):
    """The rows of ``table`` for the samples of ``exp.train`` (inputs are global ids)."""
    return table[exp.train.load()[0]]


def test_herding_needs_the_features_of_every_training_sample():
    exps, _ = _stream([6])
    buf = ReplayBuffer(4, "herding")
    with pytest.raises(ValueError, match="herding needs the features"):
        buf.update(exps[0])
    with pytest.raises(ValueError, match="herding needs the features"):
        buf.update(exps[0], features=torch.zeros(5, 3))


def test_herding_keeps_m_per_class_in_selection_order_and_cuts_old_classes_to_a_prefix():
    exps, ds = _stream([30, 30], labels_of=lambda k, n: [2 * k + i % 2 for i in range(n)])
    table = torch.randn(60, 4, generator=torch.Generator().manual_seed(0))
    buf = ReplayBuffer(13, "herding")
    buf.update(exps[0], features=_features_of(exps[0], table))
    first = {c: [i for i, y in zip(_global_ids(buf, exps), buf.labels.tolist()) if y == c] for c in (0, 1)}
    assert [len(v) for v in first.values()] == [6, 6]  # 13 // 2, the remainder unused (iCaRL)
    for c, ids in first.items():  # in selection order: the herding order of the class's samples
        pool = torch.tensor([i for i in range(30) if ds.targets[i] == c])
        assert ids == pool[herding_order(table[pool], 6)].tolist()
    buf.update(exps[1], features=_features_of(exps[1], table))
    second = {c: [i for i, y in zip(_global_ids(buf, exps), buf.labels.tolist()) if y == c] for c in range(4)}
    assert [len(v) for v in second.values()] == [3, 3, 3, 3]
    assert second[0] == first[0][:3] and second[1] == first[1][:3]
    assert buf.n_seen == 60


def test_herding_takes_every_sample_of_a_small_class_and_reselects_a_class_met_again():
    exps, _ = _stream([3, 10, 10], labels_of=lambda k, n: [0] * n if k != 1 else [1] * n)
    table = torch.randn(23, 4, generator=torch.Generator().manual_seed(1))
    buf = ReplayBuffer(10, "herding")
    buf.update(exps[0], features=_features_of(exps[0], table))
    assert sorted(_global_ids(buf, exps)) == [0, 1, 2]  # fewer samples than m = 10
    buf.update(exps[1], features=_features_of(exps[1], table))
    assert Counter(buf.labels.tolist()) == {0: 3, 1: 5}
    buf.update(exps[2], features=_features_of(exps[2], table))  # class 0 again: chosen from its new data
    ids = _global_ids(buf, exps)
    assert Counter(buf.labels.tolist()) == {0: 5, 1: 5}
    assert all(i >= 13 for i, y in zip(ids, buf.labels.tolist()) if y == 0)


def test_herding_state_round_trip():
    exps, _ = _stream([20, 20], labels_of=lambda k, n: [2 * k + i % 2 for i in range(n)])
    table = torch.randn(40, 4, generator=torch.Generator().manual_seed(2))
    src, dst = _Holder(8, "herding"), _Holder(8, "herding")
    src.buffer.update(exps[0], features=_features_of(exps[0], table))
    dst.load_state_dict(src.state_dict())
    for holder in (src, dst):
        holder.buffer.update(exps[1], features=_features_of(exps[1], table))
    assert torch.equal(dst.buffer.items, src.buffer.items) and dst.buffer.n_seen == 40


def test_add_is_reservoir_sampling_over_the_batches_of_a_stream():
    """Offered batch by batch, every sample stays with probability capacity / n_seen (Vitter 1985):
    over 2,000 seeded streams each of 100 positions is kept 20 +- 4 sigma percent of the time."""
    import torch

    from clpeft.components.memory.replay import ReplayBuffer
    from clpeft.data import ArrayDataset, DataView
    from clpeft.experience import Experience

    data = ArrayDataset(torch.zeros(100, 2), torch.arange(100) % 5, "stream")
    exp = Experience(0, DataView.of(data), None, list(range(5)), list(range(5)))
    kept = torch.zeros(100)
    for seed in range(2000):
        buffer = ReplayBuffer(20, "reservoir")
        generator = torch.Generator().manual_seed(seed)
        for start in range(0, 100, 16):
            positions = torch.arange(start, min(start + 16, 100))
            buffer.add(exp, positions, exp.train.targets[positions], generator)
        assert len(buffer) == 20 and buffer.n_seen == 100
        kept[buffer.items[:, 1]] += 1
    p = kept / 2000
    sigma = (0.2 * 0.8 / 2000) ** 0.5
    assert (p - 0.2).abs().max() < 4 * sigma + 0.01
    sample = buffer.sample(5, [exp], generator)
    assert len(sample) == 5 and set(sample.targets.tolist()) <= set(range(5))
    with pytest.raises(ValueError, match="a class_balanced buffer is filled with update"):
        ReplayBuffer(5, "class_balanced").add(exp, torch.arange(3), torch.zeros(3, dtype=torch.long))
