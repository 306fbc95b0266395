"""Tests for ``clpeft.components.memory.logits.LogitsStore`` and the slots ``ReplayBuffer`` reports for it.

DER keeps each reservoir sample's logits at the sample's slot: ``ReplayBuffer.add`` says where each
offered sample went, ``draw``/``at`` give the samples of chosen slots in order, and the store holds
logits of growing width (the head grows). Checked against plain Python bookkeeping and numpy.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from clpeft.components.memory.logits import LogitsStore
from clpeft.components.memory.replay import ReplayBuffer
from clpeft.data import ArrayDataset, DataView
from clpeft.experience import Experience


def _stream(sizes=(30, 30)):
    """Experiences whose input ``i`` is the integer ``i``, label = experience index."""
    ds = ArrayDataset(torch.arange(sum(sizes)), torch.cat([torch.full((n,), k) for k, n in enumerate(sizes)]), "ids")
    exps, start = [], 0
    for k, n in enumerate(sizes):
        exps.append(Experience(k, DataView.of(ds, torch.arange(start, start + n).flip(0)), None, [k], []))
        start += n
    return exps


def test_add_reports_the_slot_of_every_stored_sample():
    stream = _stream()
    buffer = ReplayBuffer(8)
    torch.manual_seed(0)
    owner = {}  # slot -> the sample id last written there, tracked from the reported slots
    replaced = 0
    for exp in stream:
        for positions in torch.arange(len(exp.train)).split(5):
            labels = exp.train.take(positions).targets
            slots = buffer.add(exp, positions, labels)
            assert slots.shape == positions.shape and slots.dtype == torch.long
            ids = exp.train.load(positions)[0]
            for sample, slot in zip(ids.tolist(), slots.tolist()):
                if slot >= 0:
                    replaced += slot in owner
                    owner[slot] = sample
    assert replaced > 0 and sorted(owner) == list(range(8))
    stored = buffer.at(torch.arange(8), stream).load()[0].tolist()
    assert stored == [owner[s] for s in range(8)]


def test_at_keeps_the_slot_order_and_sample_draws_the_same_slots():
    stream = _stream()
    buffer = ReplayBuffer(10)
    buffer.update(stream[0], generator=torch.Generator().manual_seed(1))
    buffer.update(stream[1], generator=torch.Generator().manual_seed(2))
    slots = buffer.draw(6, torch.Generator().manual_seed(3))
    ordered = buffer.at(slots, stream).load()[0]
    everything = buffer.at(torch.arange(10), stream).load()[0]
    assert torch.equal(ordered, everything[slots])
    sampled = buffer.sample(6, stream, torch.Generator().manual_seed(3)).load()[0]
    assert sorted(sampled.tolist()) == sorted(ordered.tolist())


def test_write_keeps_the_last_row_for_a_repeated_slot_and_ignores_minus_one():
    store = LogitsStore(4)
    store.write(torch.tensor([2, -1, 2, 0]), torch.tensor([[1.0, 1.0], [9.0, 9.0], [3.0, 4.0], [5.0, 6.0]]))
    values, mask = store.read(torch.tensor([0, 1, 2]))
    assert values.tolist() == [[5.0, 6.0], [0.0, 0.0], [3.0, 4.0]]
    assert mask.tolist() == [[True, True], [False, False], [True, True]]


def test_mse_covers_the_logits_each_sample_was_stored_with():
    store = LogitsStore(3)
    rng = np.random.default_rng(0)
    narrow, wide = rng.normal(size=(2, 2)), rng.normal(size=(1, 4))
    store.write(torch.tensor([0, 1]), torch.tensor(narrow, dtype=torch.float32))
    store.write(torch.tensor([2]), torch.tensor(wide, dtype=torch.float32))  # the head grew to 4, then 6
    outputs = rng.normal(size=(3, 6))
    squared = [((outputs[0, :2] - narrow[0]) ** 2), ((outputs[1, :2] - narrow[1]) ** 2), ((outputs[2, :4] - wide[0]) ** 2)]
    expected = sum(s.sum() for s in squared) / sum(len(s) for s in squared)
    got = store.mse(torch.tensor([0, 1, 2]), torch.tensor(outputs, dtype=torch.float32))
    assert abs(got.item() - expected) < 1e-6


def test_mse_equals_torch_mse_when_the_head_did_not_grow_and_has_a_gradient():
    store = LogitsStore(5)
    stored = torch.randn(5, 3)
    store.write(torch.arange(5), stored)
    outputs = torch.randn(4, 3, requires_grad=True)
    slots = torch.tensor([4, 0, 2, 2])
    loss = store.mse(slots, outputs)
    torch.testing.assert_close(loss, F.mse_loss(outputs, stored[slots]))
    loss.backward()
    assert outputs.grad is not None and outputs.grad.abs().sum() > 0


def test_state_round_trip():
    store = LogitsStore(4)
    store.write(torch.tensor([1, 3]), torch.randn(2, 5))
    fresh = LogitsStore(4)
    fresh.load_state_dict(store.state_dict())
    slots = torch.arange(4)
    (values, mask), (loaded, loaded_mask) = store.read(slots), fresh.read(slots)
    assert torch.equal(values, loaded) and torch.equal(mask, loaded_mask) and mask[1].all() and not mask[0].any()
