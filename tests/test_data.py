"""Tests for ``clpeft.data``: ``ArrayDataset`` and ``DataView``.

The datasets here have inputs that name themselves (``x[i]`` holds ``i`` plus a dataset tag),
so every position of a view can be checked against plain tensor indexing.
"""

from __future__ import annotations

import pytest
import torch

from clpeft.data import ArrayDataset, Batch, DataView


def _ds(n=10, tag=0, name=None):
    """Inputs (n, 2): column 0 = index, column 1 = tag; labels = (index * 3 + tag) % 4."""
    idx = torch.arange(n)
    x = torch.stack([idx, torch.full((n,), tag)], dim=1)
    return ArrayDataset(x, (idx * 3 + tag) % 4, name or f"ds{tag}")


def _parts(view):
    return [(ds, idx.tolist()) for ds, idx in view.parts]


# --------------------------------------------------------------------------------------------
# DataView
# --------------------------------------------------------------------------------------------


def test_of_without_indices_covers_the_dataset_in_order():
    ds = _ds(7)
    v = DataView.of(ds)
    assert len(v) == 7
    x, y = v.load()
    assert torch.equal(x, ds.inputs) and torch.equal(y, ds.targets)


def test_load_equals_indexing_the_base_tensors():
    ds = _ds(20)
    idx = torch.tensor([5, 3, 19, 3, 0])  # unsorted, with a repeat
    v = DataView.of(ds, idx)
    x, y = v.load()
    assert torch.equal(x, ds.inputs[idx]) and torch.equal(y, ds.targets[idx])
    assert torch.equal(v.targets, ds.targets[idx])
    # load(positions) == load of take(positions) == base indexing of idx[positions]
    pos = [4, 1, 1, 2]
    x2, y2 = v.load(pos)
    assert torch.equal(x2, ds.inputs[idx[pos]]) and torch.equal(y2, ds.targets[idx[pos]])


def test_take_keeps_the_requested_order_within_one_part():
    ds = _ds(10)
    v = DataView.of(ds, [5, 3, 9, 1])
    sub = v.take([2, 0, 3])
    assert _parts(sub) == [(ds, [9, 5, 1])]
    assert sub.load()[0][:, 0].tolist() == [9, 5, 1]


def test_take_across_parts_splits_into_runs_in_request_order():
    a, b = _ds(6, tag=1), _ds(6, tag=2)
    v = DataView.of(a, [0, 1, 2]) + DataView.of(b, [3, 4])  # positions 0..2 -> a, 3..4 -> b
    sub = v.take([4, 0, 1, 3, 2])
    assert _parts(sub) == [(b, [4]), (a, [0, 1]), (b, [3]), (a, [2])]
    x, y = sub.load()
    assert x.tolist() == [[4, 2], [0, 1], [1, 1], [3, 2], [2, 1]]
    # labels (i * 3 + tag) % 4: b4 -> 14 % 4, a0 -> 1, a1 -> 4 % 4, b3 -> 11 % 4, a2 -> 7 % 4
    assert y.tolist() == [2, 1, 0, 3, 3]


def test_load_of_a_multi_part_view_matches_a_python_loop():
    a, b, c = _ds(8, 1), _ds(5, 2), _ds(9, 3)
    v = DataView.of(a, [7, 1]) + DataView.of(b, [4, 4, 0]) + DataView.of(c, [8])
    expected_x = torch.stack([a.inputs[7], a.inputs[1], b.inputs[4], b.inputs[4], b.inputs[0], c.inputs[8]])
    expected_y = torch.stack([a.targets[7], a.targets[1], b.targets[4], b.targets[4], b.targets[0], c.targets[8]])
    x, y = v.load()
    assert torch.equal(x, expected_x) and torch.equal(y, expected_y)
    assert torch.equal(v.targets, expected_y)
    # every position agrees with take([i]).load()
    for i in range(len(v)):
        xi, yi = v.take([i]).load()
        assert torch.equal(xi[0], expected_x[i]) and yi.item() == expected_y[i].item()


def test_add_merges_adjacent_parts_of_the_same_dataset():
    a, b = _ds(10, 1), _ds(10, 2)
    v = DataView.of(a, [1, 2]) + DataView.of(a, [7, 2])
    assert _parts(v) == [(a, [1, 2, 7, 2])]
    w = DataView.of(a, [1]) + DataView.of(b, [2]) + DataView.of(a, [3])
    assert _parts(w) == [(a, [1]), (b, [2]), (a, [3])]  # not adjacent: order is kept
    # merging uses identity, not equality: an equal copy of a dataset is another part
    a2 = _ds(10, 1)
    assert len((DataView.of(a, [0]) + DataView.of(a2, [0])).parts) == 2


def test_add_leaves_its_operands_unchanged_and_preserves_order():
    a = _ds(10, 1)
    left, right = DataView.of(a, [4, 5]), DataView.of(a, [0])
    both = left + right
    assert _parts(left) == [(a, [4, 5])] and _parts(right) == [(a, [0])]
    assert both.load()[0][:, 0].tolist() == [4, 5, 0]
    assert len(both) == len(left) + len(right)


def test_empty_views():
    ds = _ds(5)
    empty = DataView([])
    assert len(empty) == 0 and empty.parts == []
    assert empty.targets.dtype == torch.long and empty.targets.shape == (0,)
    assert len(DataView.of(ds, [])) == 0 and DataView.of(ds, []).parts == []  # empty parts dropped
    assert len(DataView.of(ds).take([])) == 0
    v = DataView.of(ds, [3, 1])
    assert _parts(empty + v) == _parts(v) and _parts(v + empty) == _parts(v)
    assert len(DataView([(ds, torch.tensor([], dtype=torch.long)), (ds, torch.tensor([2]))]).parts) == 1


def test_load_of_an_empty_selection_returns_empty_tensors():
    """``load`` of zero positions gives zero-length tensors (not a torch.cat error)."""
    v = DataView.of(_ds(5), [3, 1])
    x, y = v.load([])
    assert len(x) == 0 and len(y) == 0


def test_load_works_for_datasets_without_gather():
    class ListDataset:
        name = "list"

        def __init__(self):
            self.items = [(torch.tensor([i, -i]), i % 3) for i in range(6)]
            self.targets = torch.tensor([i % 3 for i in range(6)])

        def __len__(self):
            return len(self.items)

        def __getitem__(self, i):
            return self.items[i]

        @property
        def fingerprint(self):
            return "list"

    ds = ListDataset()
    v = DataView.of(ds, [5, 0, 2])
    x, y = v.load()
    assert x.tolist() == [[5, -5], [0, 0], [2, -2]] and y.tolist() == [2, 0, 2]


def test_batch_unpacks_as_a_pair():
    x, y = Batch(torch.ones(2, 3), torch.tensor([0, 1]))
    assert x.shape == (2, 3) and y.tolist() == [0, 1]
    assert Batch(torch.ones(1)).y is None


# --------------------------------------------------------------------------------------------
# ArrayDataset
# --------------------------------------------------------------------------------------------


def _images(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (6, 1, 4, 4), generator=g, dtype=torch.uint8)


def test_fingerprint_equal_for_equal_data_and_sensitive_to_one_pixel():
    imgs = _images()
    labels = torch.arange(6) % 2
    a = ArrayDataset(imgs, labels, "x/train")
    b = ArrayDataset(imgs.clone(), labels.clone(), "x/train")  # equal data, separate storage
    assert a.fingerprint == b.fingerprint
    changed = imgs.clone()
    changed[3, 0, 2, 1] ^= 1  # one pixel, one bit
    assert ArrayDataset(changed, labels, "x/train").fingerprint != a.fingerprint
    assert ArrayDataset(imgs, labels, "x/test").fingerprint != a.fingerprint  # the name counts
    # same bytes, different shape
    assert ArrayDataset(imgs.reshape(6, 1, 2, 8), labels, "x/train").fingerprint != a.fingerprint
    # a non-contiguous view of the same values hashes like the contiguous tensor
    t = imgs.permute(0, 1, 3, 2).contiguous().permute(0, 1, 3, 2)
    assert not t.is_contiguous()
    assert ArrayDataset(t, labels, "x/train").fingerprint == a.fingerprint
    assert ArrayDataset(imgs.numpy(), labels, "x/train").fingerprint == a.fingerprint


def test_relabel_maps_labels_and_shares_inputs():
    imgs = _images()
    ds = ArrayDataset(imgs, torch.tensor([0, 1, 2, 2, 1, 0]), "x", ["a", "b", "c"])
    mapping = torch.tensor([2, 0, 1])  # old -> new
    re = ds.relabel(mapping, ["b", "c", "a"])
    assert re.targets.tolist() == [2, 0, 1, 1, 0, 2]
    assert re.inputs is ds.inputs
    assert re.class_names == ["b", "c", "a"]
    assert ds.targets.tolist() == [0, 1, 2, 2, 1, 0]  # the original is untouched
    # features depend on inputs only: a relabelled dataset keeps its cache key
    assert re.fingerprint == ds.fingerprint


def test_gather_and_getitem_agree():
    ds = ArrayDataset(_images(), torch.arange(6), "x")
    idx = torch.tensor([4, 0, 4])
    x, y = ds.gather(idx)
    for k, i in enumerate(idx.tolist()):
        xi, yi = ds[i]
        assert torch.equal(x[k], xi) and y[k] == yi


def test_length_mismatch_is_an_error():
    with pytest.raises(ValueError, match="3 inputs but 2 labels"):
        ArrayDataset(torch.zeros(3, 2), torch.tensor([0, 1]), "bad")
