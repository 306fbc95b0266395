"""InputSubspace (InfLoRA's A design; the official and GPM's basis updates) against hand-worked and numpy computations.

The official code itself is run beside it in ``tests/reference/test_inflora.py``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from clpeft.components.lora import LoRALinear
from clpeft.components.lora.input_subspace import InputSubspace


def _layers(d: int = 4, rank: int = 1, n: int = 1) -> dict[str, LoRALinear]:
    torch.manual_seed(0)
    return {f"l{i}": LoRALinear(nn.Linear(d, 3), rank=rank, alpha=1.0) for i in range(n)}


def test_gpm_keeps_the_fewest_directions_that_reach_the_threshold_hand_worked():
    layers = _layers()
    subspace = InputSubspace(layers, threshold=0.7, criterion="gpm")
    # eigenvalues 4, 3, 2, 1: 70% of the energy needs the first two directions
    assert subspace.extend([torch.diag(torch.tensor([4.0, 3.0, 2.0, 1.0], dtype=torch.float64))]) == [2]
    np.testing.assert_array_equal(subspace.basis(0).numpy(), np.eye(4)[:, :2])
    # a second task: 2 of its 10 units are inside span(e1, e2), so 5 more are needed: the e3 direction
    assert subspace.extend([torch.diag(torch.tensor([1.0, 1.0, 5.0, 3.0], dtype=torch.float64))]) == [1]
    np.testing.assert_allclose(np.abs(subspace.basis(0).numpy()), np.eye(4)[:, :3], atol=1e-12)
    # a task already inside the subspace adds nothing
    assert subspace.extend([torch.diag(torch.tensor([2.0, 2.0, 2.0, 0.0], dtype=torch.float64))]) == [0]


def test_official_rule_squares_the_eigenvalues_hand_worked():
    """``criterion="inflora"`` (the default, ``update_DualGPM``): energies are squared eigenvalues.

    Eigenvalues 4, 3, 2, 1 -> energies 16, 9, 4, 1 of 30. After the first task at 0.7 the
    official count is the prefixes still below 0.7: 16/30 = 0.53 only, so 1 direction (GPM's
    rule on the plain eigenvalues: 2). A second task then adds the fewest reaching the threshold.
    """
    subspace = InputSubspace(_layers(), threshold=0.7)
    assert subspace.criterion == "inflora"
    assert subspace.extend([torch.diag(torch.tensor([4.0, 3.0, 2.0, 1.0], dtype=torch.float64))]) == [1]
    np.testing.assert_array_equal(subspace.basis(0).numpy(), np.eye(4)[:, :1])
    # energies 1, 1, 25, 9 of 36; 1 inside span(e1); 0.7 * 36 = 25.2 needs e3 (26) -> 1 direction
    assert subspace.extend([torch.diag(torch.tensor([1.0, 1.0, 5.0, 3.0], dtype=torch.float64))]) == [1]
    np.testing.assert_allclose(np.abs(subspace.basis(0).numpy()), np.eye(4)[:, [0, 2]], atol=1e-12)
    # at least one direction after the first task, even when the first share already passes
    first_only = InputSubspace(_layers(), threshold=0.5)
    assert first_only.extend([torch.diag(torch.tensor([9.0, 1.0, 1.0, 1.0], dtype=torch.float64))]) == [1]


def test_threshold_schedule_interpolates_from_lamb_to_lame_hand_worked():
    """InfLoRA's epsilon_t = lamb + (lame - lamb) t / T: (0.5, 1.0) at t / T = 0.4 is 0.7."""
    eigen = torch.diag(torch.tensor([4.0, 3.0, 2.0, 1.0], dtype=torch.float64))
    scheduled = InputSubspace(_layers(), threshold=(0.5, 1.0), criterion="gpm")
    assert scheduled.extend([eigen], progress=0.0) == [2]  # 0.5 of 10 units: 4 + 3 (4 alone is short)
    fresh = InputSubspace(_layers(), threshold=(0.5, 1.0), criterion="gpm")
    assert fresh.extend([eigen], progress=0.4) == [2]  # 0.7: still 4 + 3
    fresh = InputSubspace(_layers(), threshold=(0.5, 1.0), criterion="gpm")
    assert fresh.extend([eigen], progress=0.8) == [3]  # 0.9: 4 + 3 + 2


def test_gpm_criterion_matches_numpy_on_a_random_covariance():
    rng = np.random.default_rng(0)
    d = 12
    layers = _layers(d)
    subspace = InputSubspace(layers, threshold=0.9, criterion="gpm")
    first = rng.normal(size=(200, d)) @ np.diag(np.linspace(3, 0.1, d))
    subspace.extend([torch.from_numpy(first.T @ first / 200)])
    m = subspace.basis(0).numpy()
    second = rng.normal(size=(200, d)) @ rng.normal(size=(d, d))
    cov = second.T @ second / 200
    k = subspace.extend([torch.from_numpy(cov)])[0]
    # numpy: eigen-decompose the covariance outside span(M), add directions until 90% is inside
    outside = np.eye(d) - m @ m.T
    values = np.sort(np.clip(np.linalg.eigvalsh(outside @ cov @ outside), 0, None))[::-1]
    inside = np.trace(m.T @ cov @ m)
    energy = inside + np.concatenate([[0.0], np.cumsum(values)])
    expected = int(np.argmax(energy >= 0.9 * np.trace(cov)))
    assert k == expected and energy[k - 1] < 0.9 * np.trace(cov)
    basis = subspace.basis(0).numpy()
    np.testing.assert_allclose(basis.T @ basis, np.eye(basis.shape[1]), atol=1e-10)  # still orthonormal


def test_designed_a_is_frozen_orthogonal_to_the_basis_and_spans_the_top_projected_directions():
    rng = np.random.default_rng(1)
    d, rank = 10, 3
    layers = _layers(d, rank=rank)
    subspace = InputSubspace(layers, threshold=0.8)
    old = rng.normal(size=(300, d)) @ np.diag([5, 4, 3, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1])
    subspace.extend([torch.from_numpy(old.T @ old / 300)])
    new = rng.normal(size=(300, d)) @ rng.normal(size=(d, d))
    cov = new.T @ new / 300
    subspace.design(layers, [torch.from_numpy(cov)])
    a = layers["l0"].lora_A
    assert not a.requires_grad and a.shape == (rank, d)
    m = subspace.basis(0).numpy()
    np.testing.assert_allclose(a.detach().double().numpy() @ m, 0, atol=1e-6)  # B A x = 0 for x in span(M)
    np.testing.assert_allclose(a.detach().double().numpy() @ a.detach().double().numpy().T, np.eye(rank) / 3, atol=1e-6)
    u = np.linalg.svd(cov - m @ (m.T @ cov))[0][:, :rank]
    np.testing.assert_allclose(np.abs(a.detach().double().numpy() * math.sqrt(3)), np.abs(u.T), atol=1e-5)


def test_covariances_are_the_mean_outer_product_of_each_layers_inputs():
    layers = _layers(d=5, n=2)
    first, second = layers["l0"], LoRALinear(nn.Linear(3, 2), rank=1, alpha=1.0)
    model = nn.Sequential(first, nn.Tanh(), second)
    xs = [torch.randn(7, 5), torch.randn(4, 5)]
    covs = InputSubspace.covariances({"a": first, "b": second}, lambda: [model(x) for x in xs])
    x = torch.cat(xs).double()
    h = torch.tanh(first(torch.cat(xs))).double()
    torch.testing.assert_close(covs[0], x.T @ x / 11)
    torch.testing.assert_close(covs[1], h.T @ h / 11, rtol=1e-5, atol=1e-6)
    assert not first._forward_pre_hooks and not second._forward_pre_hooks  # hooks removed


def test_state_dict_round_trip_restores_the_bases():
    layers = _layers()
    subspace = InputSubspace(layers, threshold=0.7)
    subspace.extend([torch.diag(torch.tensor([4.0, 3.0, 2.0, 1.0], dtype=torch.float64))])
    fresh = InputSubspace(_layers(), threshold=0.7)
    fresh.load_state_dict(subspace.state_dict())
    assert torch.equal(fresh.basis(0), subspace.basis(0))


@pytest.mark.parametrize("threshold", [0.5, 0.99])
def test_a_higher_threshold_keeps_more_directions(threshold):
    rng = np.random.default_rng(2)
    x = rng.normal(size=(100, 8)) @ np.diag(np.linspace(2, 0.2, 8))
    subspace = InputSubspace(_layers(8), threshold=threshold, criterion="gpm")
    k = subspace.extend([torch.from_numpy(x.T @ x / 100)])[0]
    assert (k <= 4) if threshold == 0.5 else (k >= 7)


def _with_basis(d: int, columns: list[int], rank: int) -> tuple[dict[str, LoRALinear], InputSubspace]:
    layers = _layers(d, rank=rank)
    subspace = InputSubspace(layers)
    subspace.basis_0 = torch.eye(d, dtype=torch.float64)[:, columns]
    return layers, subspace


def test_fewer_directions_than_the_rank_outside_the_basis_leave_zero_rows_hand_worked():
    """Basis e1, e2, e3 of R^4 and rank 3: one direction, e4, is left. The official design takes three singular
    vectors of ``(I - M M^T) C = diag(0, 0, 0, 1)``; the two after e4 complete it inside span(M). Here they are zero."""
    layers, subspace = _with_basis(4, [0, 1, 2], rank=3)
    cov = torch.diag(torch.tensor([4.0, 3.0, 2.0, 1.0], dtype=torch.float64))
    official = torch.linalg.svd(cov - subspace.basis(0) @ (subspace.basis(0).T @ cov))[0][:, :3].T
    assert float((official[1:] @ subspace.basis(0)).norm()) > 0.99  # the completion lies inside the old subspace
    assert subspace.design(layers, [cov]) == [1]
    a = layers["l0"].lora_A.detach().double()
    np.testing.assert_allclose(a.abs().numpy(), [[0, 0, 0, 1 / math.sqrt(3)], [0] * 4, [0] * 4], atol=1e-12)
    # a task whose inputs have one direction outside a one-dimensional basis: the same, the basis far from full
    layers, subspace = _with_basis(4, [0], rank=3)
    assert subspace.design(layers, [torch.diag(torch.tensor([4.0, 3.0, 0.0, 0.0], dtype=torch.float64))]) == [1]
    np.testing.assert_allclose(layers["l0"].lora_A.detach().double().abs().numpy(), [[0, 1 / math.sqrt(3), 0, 0], [0] * 4, [0] * 4])


def test_a_full_basis_designs_a_zero_update_that_trains_nothing():
    layers, subspace = _with_basis(4, [2, 0, 3, 1], rank=2)
    rng = np.random.default_rng(3)
    x = torch.from_numpy(rng.normal(size=(50, 4)))
    assert subspace.design(layers, [x.T @ x / 50]) == [0]
    layer = layers["l0"]
    assert not layer.lora_A.any()
    layer(x.float()).square().sum().backward()
    assert not layer.lora_B.grad.any()  # B's columns get no gradient from zero rows


def test_enough_directions_outside_the_basis_keep_the_official_design():
    """The usual case: the top ``r`` singular values are far above rounding, and ``A`` is the official ``U_r^T / sqrt(3)``
    (also when an LLM-like outlier feature makes the covariance's norm 1e6 times its other eigenvalues)."""
    rng = np.random.default_rng(4)
    d, rank = 12, 4
    layers, subspace = _with_basis(d, list(range(d - rank)), rank=rank)
    x = rng.normal(size=(200, d))
    x[:, 0] *= 1e3
    cov = torch.from_numpy(x.T @ x / 200)
    assert subspace.design(layers, [cov]) == [rank]
    m = subspace.basis(0)
    u = torch.linalg.svd(cov - m @ (m.T @ cov))[0][:, :rank]
    torch.testing.assert_close(layers["l0"].lora_A.detach().double(), (u.T / math.sqrt(3)).float().double())
