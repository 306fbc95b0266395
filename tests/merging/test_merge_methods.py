"""Task arithmetic, TIES, DARE and mean against peft's reference implementation and by hand."""

from __future__ import annotations

import pytest
import torch
from peft.utils import merge_utils

from clpeft.merging import get_method, merge
from clpeft.merging.methods.generalized import ELECTION_COLUMNS, combine
from clpeft.merging.methods.sparsify import random_keep_mask, trim_by_magnitude_

SHAPES = [(64, 48), (1000,), (3, 4, 5, 6)]


def task_vectors(shape: tuple[int, ...], k: int = 4, seed: int = 0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=generator) for _ in range(k)]


def stacked(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.stack([t.reshape(-1) for t in tensors])


def assert_close(ours: torch.Tensor, reference: torch.Tensor) -> None:
    torch.testing.assert_close(ours.reshape(reference.shape), reference, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("shape", SHAPES)
def test_task_arithmetic_equals_peft(shape):
    tvs = task_vectors(shape)
    weights = [0.3, -0.5, 1.0, 0.7]
    ours = get_method("task_arithmetic").fn(stacked(tvs), scale=2.0, weights=weights)
    assert_close(ours, merge_utils.task_arithmetic(tvs, 2.0 * torch.tensor(weights)))


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("trim", ["threshold", "topk"])
def test_ties_equals_peft(shape, trim):
    tvs = task_vectors(shape, seed=1)  # continuous values: no ties at the cut-off
    weights = torch.tensor([0.5, 1.0, 1.5, 2.0])
    ours = get_method("ties").fn(stacked(tvs), density=0.3, scale=1.0, weights=weights.tolist(), trim=trim)
    assert_close(ours, merge_utils.ties(tvs, weights, density=0.3))


@pytest.mark.parametrize("shape", SHAPES)
def test_magnitude_prune_equals_peft(shape):
    tvs = task_vectors(shape, seed=2)
    weights = torch.tensor([1.0, 0.5, -1.0, 2.0])
    ours = combine(trim_by_magnitude_(stacked(tvs), 0.25, "topk"), weights, "sum")
    assert_close(ours, merge_utils.magnitude_prune(tvs, weights, density=0.25))


@pytest.mark.parametrize(("consensus", "reference"), [("sum", merge_utils.dare_linear), ("ties", merge_utils.dare_ties)])
def test_dare_equals_peft_given_the_same_drop_mask(monkeypatch, consensus, reference):
    shape, drop_rate, weights = (40, 30), 0.6, torch.tensor([0.5, 1.0, 1.5, 2.0])
    tvs = task_vectors(shape, seed=3)
    masks = iter(random_keep_mask(stacked(tvs), 1 - drop_rate, torch.Generator().manual_seed(11)).reshape(4, *shape))
    ours = get_method("dare").fn(
        stacked(tvs),
        drop_rate=drop_rate,
        consensus=consensus,
        weights=weights.tolist(),
        generator=torch.Generator().manual_seed(11),
    )
    with monkeypatch.context() as patch:  # peft draws one torch.bernoulli mask per task, in order
        patch.setattr(torch, "bernoulli", lambda probabilities: next(masks))
        expected = reference(tvs, weights, density=1 - drop_rate)
    assert_close(ours, expected)


def test_ties_by_hand():
    """density 0.5 keeps 2 of 4 entries per task; scale 0.5.

    trimmed:  tau_1 = [ 3, 0,  0, -4]   tau_2 = [-2, 5, 0, 0]   tau_3 = [0, 2, -3, 0]
    elected sign (sign of the column sums 1, 7, -3, -4):  [+, +, -, -]
    disjoint mean of the agreeing entries:  [3, (5 + 2) / 2, -3, -4] = [3, 3.5, -3, -4]
    times 0.5:  [1.5, 1.75, -1.5, -2]
    """
    tvs = torch.tensor([[3.0, -1.0, 0.5, -4.0], [-2.0, 5.0, -0.5, 1.0], [1.0, 2.0, -3.0, -0.25]])
    merged = get_method("ties").fn(tvs, density=0.5, scale=0.5)
    assert merged.tolist() == [1.5, 1.75, -1.5, -2.0]


def test_ties_zero_total_mass_elects_plus():
    merged = get_method("ties").fn(torch.tensor([[2.0, -1.0], [-2.0, -3.0]]), density=1.0)
    assert merged.tolist() == [2.0, -2.0]  # column 0 sums to 0: "+" wins, only the +2 is kept


@pytest.mark.parametrize("disjoint", ["mean", "sum"])
def test_ties_election_over_column_blocks_equals_the_masked_formula(disjoint):
    """A tensor longer than ELECTION_COLUMNS is elected block by block on the CPU; every entry
    must still be the paper's masked disjoint merge, computed here in float64 over the whole
    tensor (sign of the column sum, mean/sum of the agreeing non-zero entries)."""
    n = 2 * ELECTION_COLUMNS + 1234  # two full blocks and a ragged one
    generator = torch.Generator().manual_seed(5)
    tvs = torch.randn(3, n, generator=generator)
    tvs[tvs.abs() < 0.6] = 0  # trimmed entries, and columns where every task is zero
    coefficients = torch.tensor([0.5, 1.0, 2.0])
    wide = tvs.double()
    sign = torch.where(wide.sum(dim=0) >= 0, 1.0, -1.0).double()
    agree = (wide * sign > 0).double()
    total = (coefficients.double()[:, None] * wide * agree).sum(dim=0)
    expected = total / agree.sum(dim=0).clamp(min=1) if disjoint == "mean" else total
    merged = combine(tvs.clone(), coefficients, "ties", disjoint)
    torch.testing.assert_close(merged.double(), expected, rtol=0, atol=4e-6)
    whole_block = combine(tvs[:, :ELECTION_COLUMNS].clone(), coefficients, "ties", disjoint)  # one block: not split
    assert torch.equal(merged[:ELECTION_COLUMNS], whole_block)


def test_threshold_trim_keeps_ties_and_topk_keeps_exactly_k():
    row = torch.tensor([[3.0, -3.0, 1.0, 0.5]])
    assert trim_by_magnitude_(row.clone(), 0.25, "threshold").tolist() == [[3.0, -3.0, 0.0, 0.0]]
    assert int(torch.count_nonzero(trim_by_magnitude_(row.clone(), 0.25, "topk"))) == 1


def test_dare_keeps_the_expected_task_vector():
    """E[dare(tau)] = tau: the mean ratio over 10^6 entries is 1 within 5 standard errors."""
    tau = torch.randn(1, 1_000_000, generator=torch.Generator().manual_seed(0)).abs_().add_(0.5)
    drop_rate = 0.9
    dropped = get_method("dare").fn(tau.clone(), drop_rate=drop_rate, generator=torch.Generator().manual_seed(1))
    ratio = dropped / tau[0]
    standard_error = ratio.std() / tau.numel() ** 0.5
    assert abs(float(ratio.mean()) - 1.0) < 5 * standard_error
    assert abs(float((dropped == 0).float().mean()) - drop_rate) < 0.002
    plain = get_method("dare").fn(tau.clone(), drop_rate=drop_rate, rescale=False, generator=torch.Generator().manual_seed(1))
    assert abs(float((plain / tau[0]).mean()) - (1 - drop_rate)) < 5 * standard_error * (1 - drop_rate)


def test_mean_is_the_average_of_the_models(models):
    base, finetuned = models
    merged = merge(base, finetuned, "mean")
    for name, tensor in base.items():
        if tensor.is_floating_point():
            torch.testing.assert_close(merged[name], torch.stack([m[name] for m in finetuned]).mean(0), rtol=0, atol=1e-6)
        else:
            assert torch.equal(merged[name], tensor)


def test_linear_methods_expose_their_coefficients():
    assert get_method("task_arithmetic").coefficients(3, {"scale": 0.5, "weights": [1.0, 2.0, -1.0]}) == [
        0.5,
        1.0,
        -0.5,
    ]
    assert get_method("mean").coefficients(4, {}) == [0.25] * 4
    assert not get_method("ties").linear and not get_method("dare").linear


def test_dare_is_reproducible_per_seed(models):
    base, finetuned = models
    first = merge(base, finetuned, "dare", drop_rate=0.5, seed=3)
    again = merge(base, finetuned, "dare", drop_rate=0.5, seed=3)
    other = merge(base, finetuned, "dare", drop_rate=0.5, seed=4)
    assert all(torch.equal(first[n], again[n]) for n in first)
    assert not torch.equal(first["blocks.0.mlp.fc1.weight"], other["blocks.0.mlp.fc1.weight"])
