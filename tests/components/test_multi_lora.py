"""Tests for ``clpeft.components.lora.batched.MultiLoRALinear``.

The batched computation must equal the obvious loop (per adapter: select its samples, apply
it, scatter back) in outputs and in the gradients of every factor and of the input, and a stack
of trained :class:`LoRALinear` adapters must behave like each adapter on its own samples.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from clpeft.components.lora import LoRALinear
from clpeft.components.lora.batched import MultiLoRALinear
from clpeft.errors import UserError


def _multi(n_adapters=5, rank=3, in_features=12, out_features=10, seed=0) -> MultiLoRALinear:
    torch.manual_seed(seed)
    multi = MultiLoRALinear(nn.Linear(in_features, out_features), n_adapters, rank, alpha=6.0)
    with torch.no_grad():
        multi.lora_B.normal_()
    return multi


def _loop(multi: MultiLoRALinear, x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """The reference: one adapter at a time on its own samples."""
    out = multi.base_layer(x)
    for k in ids.unique().tolist():
        mask = ids == k
        delta = F.linear(F.linear(x[mask], multi.lora_A[k]), multi.lora_B[k]) * multi.scaling[k]
        out = out.index_put((mask,), out[mask] + delta)
    return out


# With 5 adapters, up to 12 tokens per sample take the all-adapters path, (9, 20, 12) the gathered one.
@pytest.mark.parametrize("shape", [(9, 7, 12), (9, 12), (9, 2, 3, 12), (9, 20, 12)])
def test_batched_equals_loop_outputs_and_gradients(shape):
    multi = _multi()
    x = torch.randn(shape)
    ids = torch.tensor([0, 3, 3, 1, 4, 0, 3, 2, 1])
    x_batched, x_loop = x.clone().requires_grad_(), x.clone().requires_grad_()
    upstream = torch.randn(*shape[:-1], 10)

    batched = multi(x_batched, ids)
    (batched * upstream).sum().backward()
    grads = multi.lora_A.grad.clone(), multi.lora_B.grad.clone()
    multi.zero_grad()
    looped = _loop(multi, x_loop, ids)
    (looped * upstream).sum().backward()

    torch.testing.assert_close(batched, looped, rtol=1e-6, atol=1e-5)
    with torch.no_grad():  # the inference path accumulates in place
        torch.testing.assert_close(multi(x, ids), batched, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(grads[0], multi.lora_A.grad, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(grads[1], multi.lora_B.grad, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(x_batched.grad, x_loop.grad, rtol=1e-6, atol=1e-5)
    assert grads[1][[0, 1, 2, 3, 4]].abs().sum(dim=(1, 2)).min() > 0  # every used adapter learns
    assert multi.base_layer.weight.grad is None


def test_unused_adapters_get_zero_gradient_and_initial_output_is_base():
    torch.manual_seed(0)
    multi = MultiLoRALinear(nn.Linear(8, 4), n_adapters=3, rank=2, alpha=2.0)
    x, ids = torch.randn(4, 8), torch.tensor([0, 0, 2, 2])
    torch.testing.assert_close(multi(x, ids), multi.base_layer(x), rtol=0, atol=0)
    with torch.no_grad():
        multi.lora_B.normal_()
    multi(x, ids).sum().backward()
    assert multi.lora_A.grad[1].abs().sum() == 0 and multi.lora_B.grad[1].abs().sum() == 0
    assert multi.lora_B.grad[0].abs().sum() > 0


def test_from_adapters_equals_each_lora_linear_on_its_samples():
    torch.manual_seed(0)
    base = nn.Linear(12, 10)
    adapters = [LoRALinear(base, rank, alpha) for rank, alpha in ((2, 4.0), (5, 5.0), (3, 12.0))]
    for adapter in adapters:
        with torch.no_grad():
            adapter.lora_B.normal_()
    adapters[1].grow(1)  # a grown adapter keeps its own scaling
    multi = MultiLoRALinear.from_adapters(adapters)

    assert multi.n_adapters == 3 and multi.lora_A.shape == (3, 6, 12)
    torch.testing.assert_close(multi.scaling, torch.tensor([2.0, 1.0, 4.0]))
    x, ids = torch.randn(6, 4, 12), torch.tensor([2, 0, 1, 1, 2, 0])
    expected = torch.stack([adapters[k](x[b]) for b, k in enumerate(ids.tolist())])
    torch.testing.assert_close(multi(x, ids), expected, rtol=0, atol=1e-5)


def test_from_adapters_refuses_merged_or_no_adapters():
    adapter = LoRALinear(nn.Linear(4, 4), 2, 2.0)
    adapter.merge()
    with pytest.raises(UserError):
        MultiLoRALinear.from_adapters([adapter])
    with pytest.raises(UserError):
        MultiLoRALinear.from_adapters([])
