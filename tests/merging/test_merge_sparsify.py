"""Magnitude trimming and its fast exact k-th-largest selection."""

from __future__ import annotations

import threading

import pytest
import torch

from clpeft.merging import fused_cpu
from clpeft.merging.methods.sparsify import (
    _SAMPLE,
    drop_and_rescale_,
    kth_largest,
    kth_largest_magnitude,
    row_thresholds,
    trim_by_magnitude_,
)

LONG = 40 * _SAMPLE  # long enough for the sampled bracket


def reference(values: torch.Tensor, k: int) -> float:
    return float(values.kthvalue(values.numel() - k + 1).values)


@pytest.mark.parametrize(
    "make",
    [
        lambda g: torch.randn(LONG, generator=g).abs(),
        lambda g: torch.randint(0, 50, (LONG,), generator=g).float(),  # heavy ties
        lambda g: torch.where(torch.rand(LONG, generator=g) < 0.9, 0.0, torch.rand(LONG, generator=g)),  # mostly zeros
        lambda g: torch.randn(1000, generator=g).abs(),  # short: plain kthvalue
    ],
    ids=["random", "ties", "zeros", "short"],
)
@pytest.mark.parametrize("fraction", [0.0, 0.01, 0.2, 0.9, 1.0])
def test_kth_largest_is_exact(make, fraction):
    values = make(torch.Generator().manual_seed(0))
    k = min(max(1, int(fraction * values.numel())), values.numel())
    assert float(kth_largest(values, k)) == reference(values, k)


@pytest.mark.parametrize("fraction", [0.0, 0.01, 0.2, 0.9, 1.0])
def test_kth_largest_magnitude_is_exact_on_signed_values(fraction):
    """Magnitudes formed block by block: negative values, exact zeros, -0.0 and equal magnitudes
    of both signs must select what kthvalue on the whole abs() selects."""
    g = torch.Generator().manual_seed(3)
    values = torch.randint(-40, 41, (LONG + 17,), generator=g).float() / 8  # +-a pairs, many ties
    values[::7] = -0.0
    k = min(max(1, int(fraction * values.numel())), values.numel())
    assert float(kth_largest_magnitude(values, k)) == reference(values.abs(), k)
    short = values[:999]
    assert float(kth_largest_magnitude(short, 10)) == reference(short.abs(), 10)


def test_kth_largest_falls_back_when_the_sample_misleads():
    values = torch.zeros(LONG)
    values[:: LONG // _SAMPLE] = 1.0  # the strided sample sees only ones; the tensor is mostly zeros
    for k in (1, 5 * _SAMPLE // 4, LONG // 2):
        assert float(kth_largest(values, k)) == reference(values, k)
        assert float(kth_largest_magnitude(-values, k)) == reference(values, k)


def test_threshold_trim_equals_masking_below_the_kth_largest_magnitude():
    task_vectors = torch.randn(3, LONG, generator=torch.Generator().manual_seed(1)).round_(decimals=2)  # many ties
    k = int(0.2 * LONG)
    magnitudes = task_vectors.abs()
    expected = task_vectors.masked_fill(magnitudes < magnitudes.kthvalue(LONG - k + 1, dim=1, keepdim=True).values, 0)
    assert torch.equal(trim_by_magnitude_(task_vectors.clone(), 0.2), expected)


@pytest.mark.skipif(not fused_cpu.available(), reason="needs the compiled CPU kernel")
def test_row_thresholds_shared_between_threads_equal_each_rows_own(monkeypatch):
    """Each row's selection runs whole on one of the torch threads (both threads take rows) and gives that
    row's own k-th largest magnitude, for the trim and for TIES' thresholds."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    threads = set()
    select = fused_cpu.kth_largest_magnitude

    def recorded(values, k):
        threads.add(threading.get_ident())
        return select(values, k)

    monkeypatch.setattr(fused_cpu, "kth_largest_magnitude", recorded)
    rows = max(LONG, fused_cpu._MIN_SHARED_ENTRIES)
    task_vectors = torch.randn(4, rows, generator=torch.Generator().manual_seed(2)).round_(decimals=2)  # many ties
    k = int(0.2 * rows)
    magnitudes = task_vectors.abs()
    expected = magnitudes.kthvalue(rows - k + 1, dim=1).values
    assert torch.equal(row_thresholds(task_vectors, 0.2, "threshold"), expected)
    assert len(threads) == 2
    assert torch.equal(trim_by_magnitude_(task_vectors.clone(), 0.2), task_vectors.masked_fill(magnitudes < expected[:, None], 0))


@pytest.mark.parametrize("trim", ["threshold", "topk"])
def test_trim_extremes(trim):
    task_vectors = torch.randn(2, 100)
    assert torch.equal(trim_by_magnitude_(task_vectors.clone(), 1.0, trim), task_vectors)
    assert not trim_by_magnitude_(task_vectors.clone(), 0.001, trim).any()  # floor(0.1) = 0 entries kept
    assert int(torch.count_nonzero(trim_by_magnitude_(task_vectors.clone(), 0.1, trim))) == 20


def test_drop_rate_zero_is_the_identity():
    task_vectors = torch.randn(2, 100)
    assert torch.equal(drop_and_rescale_(task_vectors.clone(), 0.0, True, None), task_vectors)
