"""Tests for ``clpeft.components.lora.rank_allocation.RankAllocator`` (IncreLoRA).

Two layers, of which only one affects the loss: every rank of the budget must go to that one,
the budget must never be exceeded, growth must not change the model's output, and the smoothed
scores must follow AdaLoRA's recursion.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from clpeft.components.lora import LoRALinear
from clpeft.components.lora.rank_allocation import RankAllocator
from clpeft.errors import UserError


def _layers(seed=0) -> dict[str, LoRALinear]:
    torch.manual_seed(seed)
    layers = {name: LoRALinear(nn.Linear(6, 6), rank=1, alpha=1.0) for name in ("used", "unused")}
    for layer in layers.values():
        with torch.no_grad():
            layer.lora_B.normal_()
    return layers


def _backward(layers, x):
    layers["unused"](x)  # in the graph but not in the loss: its factors get no gradient
    layers["used"](x).square().sum().backward()


def test_budget_goes_to_the_layer_that_matters_and_is_never_exceeded():
    layers = _layers()
    allocator = RankAllocator(layers, budget=6, top_k=1, rank_step=2)
    x = torch.randn(4, 6)
    grown = []
    for _ in range(5):
        for layer in layers.values():
            layer.zero_grad()
        _backward(layers, x)
        allocator.update()
        before = layers["used"](x).detach()
        grown.append(allocator.allocate())
        torch.testing.assert_close(layers["used"](x), before, rtol=0, atol=1e-6)  # growth keeps outputs
    assert grown == [{"used": 2}, {"used": 2}, {}, {}, {}]
    assert layers["used"].rank == 5 and layers["unused"].rank == 1 and allocator.total_rank == 6
    scores = allocator.scores()
    assert scores["used"] > 0 and scores["unused"] == 0


def test_top_k_and_partial_last_step():
    layers = _layers()
    allocator = RankAllocator(layers, budget=5, top_k=2, rank_step=2)
    assert allocator.allocate() == {"used": 2, "unused": 1}  # the budget leaves room for 3
    assert allocator.total_rank == 5


def test_scores_follow_adalora_smoothing():
    layers = _layers()
    allocator = RankAllocator(layers, budget=4, beta1=0.5, beta2=0.25)
    x = torch.randn(3, 6)
    sensitivities = []
    for scale in (1.0, 2.0):
        layers["used"].zero_grad()
        _backward(layers, x * scale)
        allocator.update()
        sensitivities.append([(p * p.grad).abs() for p in (layers["used"].lora_A, layers["used"].lora_B)])
    total, count = 0.0, 0
    for first, second in zip(*sensitivities, strict=True):
        i_bar = 0.5 * (0.5 * first) + 0.5 * second
        u_bar = 0.25 * (0.75 * (first - 0.5 * first).abs()) + 0.75 * (second - i_bar).abs()
        total, count = total + (i_bar * u_bar).sum().item(), count + first.numel()
    assert allocator.scores()["used"] == pytest.approx(total / count, rel=1e-5)


def test_update_after_growth_pads_the_state():
    layers = _layers()
    allocator = RankAllocator(layers, budget=4)
    x = torch.randn(3, 6)
    _backward(layers, x)
    allocator.update()
    layers["used"].grow(2)
    layers["used"].zero_grad()
    _backward(layers, x)
    allocator.update()  # state of shape rank 1 meets parameters of rank 3
    assert allocator.scores()["used"] > 0


def test_budget_below_current_rank_is_an_error():
    with pytest.raises(UserError, match="budget"):
        RankAllocator(_layers(), budget=1)


def test_split_apportions_the_budget_by_highest_averages():
    torch.manual_seed(0)
    layers = {name: LoRALinear(nn.Linear(6, 6), rank=r, alpha=1.0) for name, r in (("a", 4), ("b", 4), ("c", 1))}
    allocator = RankAllocator(layers, budget=9)
    allocator.scores = lambda: {"a": 6.0, "b": 3.0, "c": 5.0}
    # quotients score/d: a 6, 3, 2, 1.5 | b 3, 1.5, 1, .75 | c 5 (capped at rank 1)
    # largest five: a6, c5, a3, b3 (a before b on ties), a2
    assert allocator.split(5) == {"a": 3, "b": 1, "c": 1}
    assert allocator.split(0) == {"a": 0, "b": 0, "c": 0}
    assert allocator.split(100) == {"a": 4, "b": 4, "c": 1}  # never above the current ranks
    with pytest.raises(UserError, match=">= 0"):
        allocator.split(-1)
