"""Herding exemplar selection (iCaRL, Rebuffi et al. 2017, Alg. 4 and 5) against the official code.

clpeft's ``ReplayBuffer(policy="herding")`` (``clpeft/components/memory/replay.py``) is compared with

* LAMDA-PILOT (PyCIL) ``models/base.py``: ``BaseLearner.build_rehearsal_memory`` ->
  ``_reduce_exemplar`` + ``_construct_exemplar`` (the code behind PILOT's iCaRL/replay numbers);
* Mammoth ``utils/buffer.py``: ``fill_buffer(..., use_herding=True, normalize_features=True)``
  (what ``models/icarl.py`` calls);
* Avalanche's ``HerdingSelectionStrategy`` (the installed package), which herds on the raw
  features: equal on L2-normalised features, different on raw ones (clpeft normalises, as iCaRL,
  PILOT and Mammoth do).

Both references run on the very same features: every "image" is a sample id and the stand-in
network looks its feature up in a fixed table, so selections can be compared as ids. Two
experiences of two classes each, memory 16: 8 exemplars per class after the first, then the
old classes are cut to their first 4 and the new ones get 4 by herding. Tolerance: none, the
exemplar lists (ids, in selection order) must be equal; the features are drawn so that no
herding step is a near-tie (best and second-best cost more than 1e-4 apart, checked), so
float32 (references) and float64 (clpeft) arithmetic choose alike.

Mutations checked (each makes these tests fail): herding on un-normalised features; dividing
the candidate mean by ``k + 1`` instead of ``k``; keeping the *last* ``m`` exemplars of an old
class instead of the first.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from clpeft.components.memory.replay import ReplayBuffer, herding_order
from clpeft.data import ArrayDataset, DataView
from clpeft.experience import Experience, Scenario

PER_CLASS, DIM, MEMORY = 20, 6, 16
CLASSES_PER_TASK = 2


def _problem():
    """Labels of the 80 samples (classes 0,1 then 2,3) and one feature table per task (the
    network changes between tasks)."""
    labels = torch.arange(4).repeat_interleave(PER_CLASS)
    g = torch.Generator().manual_seed(0)
    tables = []
    for _ in range(2):
        scale = torch.rand(len(labels), 1, generator=g) * 3 + 0.2  # different norms: normalising matters
        tables.append((torch.randn(len(labels), DIM, generator=g) + labels[:, None] * 0.3) * scale)
    return labels, tables


def _min_gap(features: torch.Tensor, m: int) -> float:
    """Smallest gap between the best and second-best herding cost over the ``m`` steps."""
    x = features.double() / (features.double().norm(dim=1, keepdim=True) + 1e-8)
    mean, total, free, gap = x.mean(0), torch.zeros(x.shape[1], dtype=torch.float64), torch.ones(len(x), dtype=torch.bool), np.inf
    for k in range(1, m + 1):
        cost = (mean - (total + x) / k).norm(dim=1)[free]
        two = cost.topk(2, largest=False).values
        gap = min(gap, float(two[1] - two[0]))
        i = torch.nonzero(free).flatten()[int(cost.argmin())]
        free[i] = False
        total += x[i]
    return gap


def _clpeft_memory(labels, tables) -> dict[int, list[int]]:
    ds = ArrayDataset(torch.arange(len(labels)), labels, "ids")
    exps = []
    for t in range(2):
        ids = torch.nonzero((labels // CLASSES_PER_TASK) == t).flatten()
        exps.append(Experience(t, DataView.of(ds, ids), None, [2 * t, 2 * t + 1], list(range(2 * t + 2))))
    exps = Scenario.link(exps)
    buffer = ReplayBuffer(MEMORY, "herding")
    for t, exp in enumerate(exps):
        ids = exp.train.parts[0][1]
        buffer.update(exp, features=tables[t][ids])
    stored_ids = torch.stack([exps[e].train.parts[0][1][p] for e, p in buffer.items.tolist()]) if len(buffer) else []
    return {c: [int(i) for i, y in zip(stored_ids, buffer.labels) if int(y) == c] for c in range(4)}


# --------------------------------------------------------------------------------------------
# LAMDA-PILOT
# --------------------------------------------------------------------------------------------


class _IdDataset(torch.utils.data.Dataset):
    """PILOT's DummyDataset shape: ``(index, input, target)``; the input is the sample id."""

    def __init__(self, ids, targets):
        self.ids, self.targets = np.asarray(ids), np.asarray(targets)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return i, torch.tensor(int(self.ids[i])), int(self.targets[i])


class _PilotDataManager:
    """``get_dataset`` as PILOT's DataManager answers it: a class range, or an ``appendent``."""

    def __init__(self, labels):
        self.labels = labels.numpy()

    def get_dataset(self, indices, source, mode, appendent=None, ret_data=False):
        assert source == "train" and mode == "test"
        if appendent is not None and len(indices) == 0:
            data, targets = appendent
        else:
            data = np.flatnonzero(np.isin(self.labels, indices))
            targets = self.labels[data]
        dataset = _IdDataset(data, targets)
        return (data, targets, dataset) if ret_data else dataset


class _TableNetwork(nn.Module):
    def __init__(self, table):
        super().__init__()
        self.table = table
        self.feature_dim = table.shape[1]

    def extract_vector(self, ids):
        return self.table[ids.long()]


def _pilot_memory(base_module, labels, tables) -> dict[int, list[int]]:
    learner = base_module.BaseLearner({"memory_size": MEMORY, "device": ["cpu"]})
    data_manager = _PilotDataManager(labels)
    for t in range(2):
        learner._network = _TableNetwork(tables[t])
        learner._known_classes, learner._total_classes = 2 * t, 2 * t + 2
        learner.build_rehearsal_memory(data_manager, learner.samples_per_class)
    ids, targets = learner._data_memory.astype(int), learner._targets_memory.astype(int)
    return {c: ids[targets == c].tolist() for c in range(4)}


# --------------------------------------------------------------------------------------------
# Mammoth
# --------------------------------------------------------------------------------------------


class _MammothTrainSet(torch.utils.data.Dataset):
    """``(augmented input, label, not-augmented input)`` with ``data``/``targets`` it may mask."""

    def __init__(self, ids, targets):
        self.data, self.targets = ids.float(), targets

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        return self.data[i], self.targets[i], self.data[i]


class _MammothNet(nn.Module):
    def __init__(self, table):
        super().__init__()
        self.table, self.device = table, torch.device("cpu")
        self.classifier = lambda feats: torch.zeros(len(feats), 4)

    def forward(self, ids, returnt="out"):
        assert returnt == "features"
        return self.table[ids.long()].clone()


def _mammoth_memory(buffer_module, labels, tables) -> dict[int, list[int]]:
    from types import SimpleNamespace

    buffer = buffer_module.Buffer(MEMORY)
    for t in range(2):
        ids = torch.nonzero((labels // CLASSES_PER_TASK) == t).flatten()
        loader = torch.utils.data.DataLoader(_MammothTrainSet(ids, labels[ids]), batch_size=16, shuffle=False)
        dataset = SimpleNamespace(
            N_CLASSES_PER_TASK=CLASSES_PER_TASK,
            train_loader=loader,
            args=SimpleNamespace(buffer_size=MEMORY),
            get_normalization_transform=lambda: None,
        )
        buffer_module.fill_buffer(buffer, dataset, t, net=_MammothNet(tables[t]), use_herding=True, normalize_features=True)
    ids, targets = buffer.examples[: len(buffer)].long(), buffer.labels[: len(buffer)]
    return {c: ids[targets == c].tolist() for c in range(4)}


# --------------------------------------------------------------------------------------------
# tests
# --------------------------------------------------------------------------------------------


def test_the_features_have_no_near_ties():
    labels, tables = _problem()
    for t in range(2):
        for c in (2 * t, 2 * t + 1):
            assert _min_gap(tables[t][labels == c], MEMORY // (2 * t + 2)) > 1e-4


def test_herding_memory_equals_pilot(load_reference, monkeypatch):
    labels, tables = _problem()
    with load_reference("pilot", "models.base") as base:
        # PILOT's loaders ask for 4 worker processes; the ids need none (and start in 0 s)
        monkeypatch.setattr(base, "DataLoader", lambda *a, **k: torch.utils.data.DataLoader(*a, **{**k, "num_workers": 0}))
        expected = _pilot_memory(base, labels, tables)
    assert [len(v) for v in expected.values()] == [4, 4, 4, 4]
    assert _clpeft_memory(labels, tables) == expected


def test_herding_memory_equals_mammoth(load_reference, stub_module):
    labels, tables = _problem()
    stubs = {
        "utils.augmentations": stub_module("utils.augmentations", apply_transform=None),
        "utils.conf": stub_module("utils.conf", create_seeded_dataloader=None, get_device=lambda: torch.device("cpu")),
    }
    with load_reference("mammoth", "utils.buffer", stubs=stubs) as buffer_module:
        expected = _mammoth_memory(buffer_module, labels, tables)
    assert [len(v) for v in expected.values()] == [4, 4, 4, 4]
    assert _clpeft_memory(labels, tables) == expected


def test_herding_order_against_avalanche_normalised_equal_raw_different():
    """Avalanche's ``HerdingSelectionStrategy`` herds on whatever features it gets: on the
    L2-normalised features its full ordering equals clpeft's; on the raw features (what its
    ``FeatureExtractorBackbone`` hands it) it differs -- the deliberate difference: clpeft
    normalises as iCaRL (section 2.1, "all feature vectors are L2-normalized"), PILOT and
    Mammoth do."""
    from avalanche.training.storage_policy import HerdingSelectionStrategy

    labels, tables = _problem()
    features = tables[0][labels == 0]
    herd = HerdingSelectionStrategy.make_sorted_indices_from_features
    normalised = features / (features.norm(dim=1, keepdim=True) + 1e-8)
    m = 8  # the steps checked tie-free above
    assert herding_order(features, m).tolist() == herd(None, normalised)[:m]
    assert herding_order(features, m).tolist() != herd(None, features)[:m]
