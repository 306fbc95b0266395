"""DUCT's task-vector sum (``clpeft.components.regularization.representation_consolidation``)."""

from __future__ import annotations

import torch
from torch import nn

from clpeft.components.regularization.representation_consolidation import TaskVectorSum, mean_cosine


def _perturb(module: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn(p.shape, generator=g))


def test_restart_and_add_give_the_pretrained_weights_plus_the_weighted_task_vectors():
    """Two 'tasks' fine-tune from ``theta_0`` (``restart``); after each ``add`` the module holds
    ``theta_0 + sum_k w_k (theta*_k - theta_0)`` computed by hand; a fresh sum built on another
    module loads the state and restarts to the same ``theta_0``."""
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4))
    theta0 = {k: v.clone() for k, v in module.state_dict().items()}
    sums = TaskVectorSum(module)
    expected = {k: torch.zeros_like(v) for k, v in theta0.items()}
    for seed, weight in ((1, 0.3), (2, 0.7)):
        sums.restart(module)
        for k, v in module.state_dict().items():
            torch.testing.assert_close(v, theta0[k], rtol=0, atol=0)
        _perturb(module, seed)
        trained = {k: v.clone() for k, v in module.state_dict().items()}
        sums.add(module, weight)
        for k, v in module.state_dict().items():
            expected[k] += weight * (trained[k] - theta0[k])
            torch.testing.assert_close(v, theta0[k] + expected[k])
    other = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4))
    fresh = TaskVectorSum(other)
    fresh.load_state_dict(sums.state_dict())
    fresh.restart(other)
    for k, v in other.state_dict().items():
        torch.testing.assert_close(v, theta0[k], rtol=0, atol=0)


def test_mean_cosine_is_the_mean_of_row_cosines():
    before = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    after = torch.tensor([[1.0, 1.0], [0.0, -1.0]])
    assert abs(mean_cosine(before, after) - (2**-0.5 - 1) / 2) < 1e-12
