"""Tests for ``clpeft.components.heads.classifiers.LinearHead``.

The head is the one piece of state that changes shape during a run, so the checks are about
shape changes: growing must not touch what was learned, loading a checkpoint must resize a
fresh head, and asking for fewer classes must change nothing.
"""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn

from clpeft.components.heads.classifiers import LinearHead


def _trained_head(in_features=6, n_classes=3, seed=0) -> LinearHead:
    """A head whose parameters are not the initial ones (as after some training)."""
    torch.manual_seed(seed)
    head = LinearHead(in_features, n_classes)
    with torch.no_grad():
        head.weight.add_(torch.randn_like(head.weight))
        head.bias.add_(torch.randn_like(head.bias))
    return head


def test_initial_size_and_forward_equals_affine_map():
    torch.manual_seed(0)
    head = LinearHead(5, 4)
    assert head.n_classes == 4 and head.weight.shape == (4, 5) and head.bias.shape == (4,)
    x = torch.randn(7, 5, dtype=torch.float64)
    expected = x @ head.weight.double().T + head.bias.double()
    torch.testing.assert_close(head(x), expected)


def test_empty_head_gives_zero_logits_columns():
    head = LinearHead(5)
    assert head.n_classes == 0
    assert head(torch.randn(3, 5)).shape == (3, 0)


def test_grow_keeps_old_rows_and_bias_bitwise_and_old_logits():
    head = _trained_head(6, 3)
    w_old, b_old = head.weight.detach().clone(), head.bias.detach().clone()
    x = torch.randn(11, 6)
    logits_old = head(x).detach().clone()

    head.grow_to(7)

    assert head.n_classes == 7
    assert torch.equal(head.weight[:3], w_old)
    assert torch.equal(head.bias[:3], b_old)
    logits_new = head(x).detach()
    assert logits_new.shape == (11, 7)
    torch.testing.assert_close(logits_new[:, :3], logits_old, rtol=0, atol=1e-6)


def test_new_rows_follow_nn_linear_default_init_bounds():
    # nn.Linear's default: kaiming_uniform(a=sqrt(5)) -> U(-1/sqrt(in), 1/sqrt(in)) for the
    # weight, and U(-1/sqrt(in), 1/sqrt(in)) for the bias.
    torch.manual_seed(1)
    head = LinearHead(16, 0)
    head.grow_to(200)
    bound = 1 / math.sqrt(16)
    assert head.weight.abs().max() <= bound and head.bias.abs().max() <= bound
    # they really are random: spread over most of the interval, not zeros or constants
    assert head.weight.std() > 0.5 * bound / math.sqrt(3)
    assert head.bias.unique().numel() == 200


def test_grow_preserves_requires_grad_flag():
    head = LinearHead(4, 2)
    head.weight.requires_grad_(False)
    head.grow_to(5)
    assert head.weight.requires_grad is False
    assert head.bias.requires_grad is True


def test_grow_to_smaller_or_equal_is_a_noop():
    head = _trained_head(6, 5)
    w, b = head.weight, head.bias
    w_val, b_val = w.detach().clone(), b.detach().clone()
    for n in (5, 3, 0):
        head.grow_to(n)
        assert head.weight is w and head.bias is b  # same Parameter objects: optimizers stay valid
        assert torch.equal(head.weight, w_val) and torch.equal(head.bias, b_val)
    assert head.n_classes == 5


def test_repeated_growth_keeps_every_earlier_block():
    head = _trained_head(3, 2)
    blocks = [head.weight.detach().clone()]
    for n in (4, 9):
        head.grow_to(n)
        blocks.append(head.weight.detach().clone())
    assert torch.equal(blocks[2][:2], blocks[0])
    assert torch.equal(blocks[2][:4], blocks[1])


@pytest.mark.parametrize("start", [0, 2, 9])
def test_load_state_dict_resizes_fresh_head(start):
    big = _trained_head(6, 5, seed=3)
    fresh = LinearHead(6, start)
    fresh.load_state_dict(big.state_dict())
    assert fresh.n_classes == 5
    assert torch.equal(fresh.weight, big.weight) and torch.equal(fresh.bias, big.bias)
    x = torch.randn(4, 6)
    assert torch.equal(fresh(x), big(x))


def test_load_into_head_nested_in_module_through_serialisation():
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Linear(3, 6)
            self.head = LinearHead(6)

        def forward(self, x):
            return self.head(self.body(x))

    torch.manual_seed(0)
    src = Model()
    src.head.grow_to(4)
    src.head.grow_to(8)
    buf = io.BytesIO()
    torch.save(src.state_dict(), buf)
    buf.seek(0)
    dst = Model()
    dst.load_state_dict(torch.load(buf))
    assert dst.head.n_classes == 8
    x = torch.randn(5, 3)
    assert torch.equal(dst(x), src(x))
    # the loaded parameters are registered (an optimizer built after loading trains them)
    names = dict(dst.named_parameters())
    assert names["head.weight"] is dst.head.weight and names["head.weight"].shape == (8, 6)


def test_load_keeps_frozen_flag():
    big = _trained_head(4, 3)
    fresh = LinearHead(4)
    fresh.weight.requires_grad_(False)
    fresh.bias.requires_grad_(False)
    fresh.load_state_dict(big.state_dict())
    assert not fresh.weight.requires_grad and not fresh.bias.requires_grad
