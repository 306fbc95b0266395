"""Tests for ``clpeft.feature_cache.FeatureCache`` with a small frozen MLP backbone.

Reference: a direct ``backbone(x)`` pass on the raw inputs of the same view. ``cache.computed``
counts samples sent through the backbone, so "computed nothing" is observable.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from clpeft.backbones.mlp import MLPBackbone
from clpeft.data import ArrayDataset, DataView
from clpeft.feature_cache import FeatureCache
from clpeft.paths import cache_root

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _cache_env(tmp_path, monkeypatch):
    monkeypatch.setenv("CLPEFT_CACHE", str(tmp_path / "env-cache"))


def _backbone(seed=0) -> MLPBackbone:
    torch.manual_seed(seed)
    return MLPBackbone(input_shape=(1, 8, 8), hidden=[16], freeze=True)


def _dataset(n=40, seed=0, name="imgs") -> ArrayDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(0, 256, (n, 1, 8, 8), generator=g, dtype=torch.uint8)
    return ArrayDataset(x, torch.arange(n) % 4, name)


@torch.no_grad()
def _direct(backbone, view) -> torch.Tensor:
    x, _ = view.load()
    return backbone(x)


def test_default_cache_dir_follows_env(tmp_path):
    assert cache_root() == tmp_path / "env-cache"


@pytest.mark.parametrize("on_disk", [False, True])
def test_features_equal_a_direct_backbone_pass(tmp_path, on_disk):
    bb, ds, other = _backbone(), _dataset(), _dataset(n=9, seed=1, name="other")
    cache = FeatureCache(bb, CPU, batch_size=4, directory=tmp_path if on_disk else None)
    # unsorted, repeated indices, two datasets, a dataset appearing in two parts
    view = DataView.of(ds, [7, 3, 3, 30, 0]) + DataView.of(other, [8, 1]) + DataView.of(ds, [39, 7])
    got = cache.features(view)
    assert got.dtype == torch.float32 and got.device.type == "cpu"
    assert got.shape == (len(view), bb.feature_dim) == (9, 16)
    torch.testing.assert_close(got, _direct(bb, view), rtol=1e-6, atol=1e-6)
    # each distinct sample was computed once, duplicates were not
    assert cache.computed == len({7, 3, 30, 0, 39}) + 2


def test_second_request_computes_nothing_and_a_superset_computes_only_the_new_samples():
    bb, ds = _backbone(), _dataset()
    cache = FeatureCache(bb, CPU, batch_size=8)
    first = cache.features(DataView.of(ds, range(10)))
    assert cache.computed == 10
    again = cache.features(DataView.of(ds, range(10)))
    assert cache.computed == 10
    assert torch.equal(first, again)
    more = cache.features(DataView.of(ds, [12, 5, 11, 0]))
    assert cache.computed == 12
    torch.testing.assert_close(more, _direct(bb, DataView.of(ds, [12, 5, 11, 0])), rtol=1e-6, atol=1e-6)
    assert torch.equal(more[1], first[5]) and torch.equal(more[3], first[0])


def test_empty_view():
    cache = FeatureCache(_backbone(), CPU)
    assert cache.features(DataView([])).shape == (0, 16)
    assert cache.computed == 0


def test_a_new_instance_reuses_features_stored_on_disk(tmp_path):
    bb, ds = _backbone(), _dataset()
    view = DataView.of(ds)
    first = FeatureCache(bb, CPU, batch_size=16, directory=tmp_path).features(view)
    files = sorted(p.name for p in tmp_path.rglob("*.npy"))
    assert files == ["done.npy", "features.npy"]

    # a new process would rebuild the backbone and the dataset from scratch: equal objects
    bb2, ds2 = _backbone(), _dataset()
    second_cache = FeatureCache(bb2, CPU, directory=tmp_path)
    second = second_cache.features(DataView.of(ds2))
    assert second_cache.computed == 0
    assert torch.equal(first, second)


def test_changing_one_backbone_weight_changes_identity_and_forces_recomputation(tmp_path):
    bb, ds = _backbone(), _dataset()
    view = DataView.of(ds, range(20))
    old = FeatureCache(bb, CPU, directory=tmp_path).features(view)
    before = bb.identity()
    assert _backbone().identity() == before  # equal weights, equal identity
    with torch.no_grad():
        bb.net[0].weight[3, 17] += 0.25
    assert bb.identity() != before

    cache = FeatureCache(bb, CPU, directory=tmp_path)
    new = cache.features(view)
    assert cache.computed == 20
    torch.testing.assert_close(new, _direct(bb, view), rtol=1e-6, atol=1e-6)
    assert not torch.equal(new, old)
    # both versions now live side by side on disk
    assert len(list(tmp_path.rglob("features.npy"))) == 2


def test_settings_of_the_backbone_are_part_of_the_identity():
    torch.manual_seed(0)
    a = MLPBackbone(input_shape=(1, 8, 8), hidden=[16], freeze=True, scale=255.0)
    torch.manual_seed(0)
    b = MLPBackbone(input_shape=(1, 8, 8), hidden=[16], freeze=True, scale=1.0)
    assert a.identity() != b.identity()


def test_a_changed_dataset_is_not_served_stale_features(tmp_path):
    bb = _backbone()
    ds = _dataset()
    FeatureCache(bb, CPU, directory=tmp_path).features(DataView.of(ds))
    x = ds.inputs.clone()
    x[5, 0, 4, 4] ^= 0xFF
    changed = ArrayDataset(x, ds.targets, ds.name)
    cache = FeatureCache(bb, CPU, directory=tmp_path)
    got = cache.features(DataView.of(changed, [5]))
    assert cache.computed == 1
    torch.testing.assert_close(got, _direct(bb, DataView.of(changed, [5])), rtol=1e-6, atol=1e-6)


def test_partially_written_store_is_recomputed(tmp_path):
    bb, ds = _backbone(), _dataset()
    view = DataView.of(ds)
    expected = FeatureCache(bb, CPU, directory=tmp_path).features(view)

    # simulate a run killed after writing some features but before marking them done:
    # garbage in the rows, their done bits false
    (fdir,) = {p.parent for p in tmp_path.rglob("features.npy")}
    values = np.load(fdir / "features.npy", mmap_mode="r+")
    done = np.load(fdir / "done.npy", mmap_mode="r+")
    lost = np.array([2, 17, 18, 39])
    values[lost] = np.nan
    done[lost] = False
    values.flush()
    done.flush()
    del values, done

    cache = FeatureCache(bb, CPU, directory=tmp_path)
    got = cache.features(view)
    assert cache.computed == len(lost)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-6)
    # the repaired rows are now marked done on disk
    assert np.load(fdir / "done.npy").all()


def test_backbone_train_mode_is_restored_for_trainable_backbones():
    torch.manual_seed(0)
    bb = MLPBackbone(input_shape=(1, 8, 8), hidden=[16], freeze=False).train()
    cache = FeatureCache(bb, CPU)
    cache.features(DataView.of(_dataset(), range(5)))
    assert bb.training


def test_a_backbone_adapted_then_frozen_is_served_features_of_its_adapted_weights(tmp_path, digits_run):
    """FSA adapts the backbone during experience 0, then freezes it; the baseline pass cached
    features of the *pretrained* weights before that. The engine must re-key the cache, so the
    run equals one without any cache, and later experiences still reuse cached features."""
    from clpeft import config
    from clpeft.engine import Engine

    digits_run["strategy"] = {"name": "fsa_lda", "adapt": "full"}
    digits_run["backbone"]["freeze"] = True
    digits_run["train"]["epochs"] = 2
    results = {}
    for mode in ("disk", "off"):
        digits_run["train"]["feature_cache"] = mode
        engine = Engine(config.resolve(digits_run), tmp_path / mode, device="cpu")
        results[mode] = engine.run()["acc_matrix"]
        if mode == "disk":
            cache = engine.built.data.cache
            assert cache is not None and cache.computed > 0
            assert cache._identity == engine.built.data.backbone.identity()  # keyed by the adapted weights
    assert results["disk"] == results["off"]
