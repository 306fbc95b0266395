"""Sinkhorn and DUCT's classifier consolidation (``clpeft.components.heads.optimal_transport``).

The plan is checked against its definition (marginals, the ``diag(u) K diag(v)`` form, the entropic
optimum's first-order condition) and, when POT is installed (``pip install pot``), against
``ot.sinkhorn`` with PILOT's arguments, including the kernel's underflow, where POT falls back.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from clpeft.components.heads.optimal_transport import sinkhorn, transport_old_heads


def _problem(n: int, m: int, scale: float = 1.0, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    cost = torch.cdist(
        scale * torch.randn(n, 5, generator=g, dtype=torch.float64), scale * torch.randn(m, 5, generator=g, dtype=torch.float64)
    )
    return torch.ones(n) / n, torch.ones(m) / m, cost


@pytest.mark.parametrize("n, m", [(3, 3), (4, 6)])
def test_plan_has_the_marginals_and_the_entropic_optimum_form(n, m):
    """Row sums ``a``, column sums ``b`` (1e-9), and ``log T_ij + C_ij / reg = f_i + g_j`` (the
    scalings' logarithms): a rank-one structure checked by the double difference being zero."""
    a, b, cost = _problem(n, m)
    a, b = torch.full((n,), 1 / n, dtype=torch.float64), torch.full((m,), 1 / m, dtype=torch.float64)  # float32 1/m: unequal masses
    plan = sinkhorn(a, b, cost, reg=0.5)
    torch.testing.assert_close(plan.sum(1), a, rtol=0, atol=1e-9)
    torch.testing.assert_close(plan.sum(0), b, rtol=0, atol=1e-9)
    log = plan.log() + cost / 0.5
    double_difference = log - log[:1] - log[:, :1] + log[:1, :1]
    torch.testing.assert_close(double_difference, torch.zeros_like(log), rtol=0, atol=1e-9)


@pytest.mark.parametrize("n, m, scale, reg", [(3, 3, 1.0, 0.5), (4, 6, 1.0, 0.02), (5, 5, 0.1, 0.02), (3, 4, 20.0, 0.02)])
def test_sinkhorn_equals_pots(n, m, scale, reg):
    """``ot.sinkhorn(a, b, M, reg)`` with PILOT's dtypes (float32 marginals, float64 costs); scale 20
    makes ``exp(-M / reg)`` underflow to 0 (POT warns and keeps its last finite scalings; so does
    clpeft, without the warning). Tolerance 1e-12 relative."""
    ot = pytest.importorskip("ot")
    a, b, cost = _problem(n, m, scale)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        expected = ot.sinkhorn(a, b, cost, reg)
    torch.testing.assert_close(sinkhorn(a, b, cost, reg), expected, rtol=1e-12, atol=1e-300)
    if scale > 1:
        assert (torch.exp(-cost / reg) == 0).all(1).any()  # the fallback case is reached


def test_transport_moves_only_older_tasks_rows_by_the_ratio():
    """Task 2's rows (the newest) are left alone; each older task's rows become ``(1 - r) W_o + r T^T W_n``
    with ``T`` the plan between the newest task's class means and the older task's. Ratio 0 leaves
    everything unchanged."""
    g = torch.Generator().manual_seed(1)
    weight, means = torch.randn(7, 4, generator=g), torch.randn(7, 4, generator=g, dtype=torch.float64)
    task_of_class = torch.tensor([0, 0, 1, 1, 1, 2, 2])
    moved = weight.clone()
    transport_old_heads(moved, means, task_of_class, 2, reg=0.3, ratio=0.4)
    torch.testing.assert_close(moved[5:], weight[5:], rtol=0, atol=0)
    for rows in ([0, 1], [2, 3, 4]):
        plan = sinkhorn(torch.ones(2) / 2, torch.ones(len(rows)) / len(rows), torch.cdist(means[5:], means[rows]), 0.3)
        torch.testing.assert_close(moved[rows], 0.6 * weight[rows] + 0.4 * (plan.T @ weight[5:].double()).float())
    unchanged = weight.clone()
    transport_old_heads(unchanged, means, task_of_class, 2, reg=0.3, ratio=0.0)
    torch.testing.assert_close(unchanged, weight, rtol=0, atol=0)
