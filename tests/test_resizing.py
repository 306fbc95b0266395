"""Optimizer state that follows a parameter replaced by a larger one (a LoRA rank grown mid-experience).

The continuation is checked against Adam and SGD with momentum written out by hand: entries that
existed keep their moments, appended entries start from zero moments, and Adam's step count (its
bias correction) stays the parameter's.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from clpeft.resizing import replace_parameters, zero_padded


def test_zero_padded_keeps_the_leading_corner_and_zeros_the_rest():
    state = torch.arange(6.0).reshape(2, 3)
    grown = zero_padded(state, torch.empty(3, 4))
    assert torch.equal(grown[:2, :3], state) and grown[2:].abs().sum() == 0 and grown[:, 3:].abs().sum() == 0
    assert zero_padded(state, torch.empty(1, 3)).abs().sum() == 0  # pruned: positions no longer correspond
    assert zero_padded(None, torch.empty(2, 2, dtype=torch.float64)).dtype == torch.float64
    assert zero_padded(state.half(), torch.empty(3, 3), torch.float32).dtype == torch.float32


def _numpy_adam(grads: list[np.ndarray], shapes: list[tuple], lr=0.1, betas=(0.9, 0.999), eps=1e-8, w0=None):
    """Adam from the paper (Kingma & Ba, Algorithm 1) with moments zero-padded when the shape grows."""
    w = w0.copy()
    m = np.zeros_like(w)
    v = np.zeros_like(w)
    for t, (g, shape) in enumerate(zip(grads, shapes), start=1):
        if w.shape != shape:
            pad = [(0, n - s) for s, n in zip(w.shape, shape)]
            w, m, v = np.pad(w, pad, constant_values=np.nan), np.pad(m, pad), np.pad(v, pad)
            w[np.isnan(w)] = 0.5  # the value the test gives new entries
        m = betas[0] * m + (1 - betas[0]) * g
        v = betas[1] * v + (1 - betas[1]) * g**2
        w = w - lr * (m / (1 - betas[0] ** t)) / (np.sqrt(v / (1 - betas[1] ** t)) + eps)
    return w


class _Holder(torch.nn.Module):
    def __init__(self, w: torch.Tensor):
        super().__init__()
        self.w = torch.nn.Parameter(w)
        self.fixed = torch.nn.Parameter(torch.zeros(2))

    def grow(self, rows: int) -> None:  # a new, larger parameter under the same name
        with torch.no_grad():
            self.w = torch.nn.Parameter(torch.cat([self.w, torch.full((rows, self.w.shape[1]), 0.5, dtype=self.w.dtype)]))


@pytest.mark.parametrize("foreach", [False, True])
def test_adam_continues_with_old_moments_and_fresh_new_entries(foreach):
    rng = np.random.default_rng(0)
    w0 = rng.standard_normal((2, 3))
    shapes = [(2, 3)] * 3 + [(4, 3)] * 3
    grads = [rng.standard_normal(s) for s in shapes]
    model = _Holder(torch.tensor(w0))
    optimizer = torch.optim.Adam([{"params": [model.fixed], "lr": 1.0}, {"params": [model.w], "lr": 0.1}], foreach=foreach)
    named = dict(model.named_parameters())
    for g, shape in zip(grads, shapes):
        if model.w.shape != shape:
            model.grow(shape[0] - model.w.shape[0])
            assert replace_parameters(optimizer, named, dict(model.named_parameters())) == 1
            named = dict(model.named_parameters())
        model.w.grad = torch.tensor(g)
        optimizer.step()
    np.testing.assert_allclose(model.w.detach().numpy(), _numpy_adam(grads, shapes, w0=w0), rtol=1e-12, atol=1e-12)
    assert optimizer.param_groups[1]["params"] == [model.w] and optimizer.param_groups[1]["lr"] == 0.1  # its group kept
    assert replace_parameters(optimizer, named, dict(model.named_parameters())) == 0


def test_sgd_momentum_buffer_is_padded():
    model = _Holder(torch.zeros(1, 2, dtype=torch.float64))
    optimizer = torch.optim.SGD([model.w], lr=1.0, momentum=0.5)
    model.w.grad = torch.ones(1, 2, dtype=torch.float64)
    optimizer.step()  # buffer = 1, w = -1
    named = dict(model.named_parameters())
    model.grow(1)
    replace_parameters(optimizer, named, dict(model.named_parameters()))
    model.w.grad = torch.ones(2, 2, dtype=torch.float64)
    optimizer.step()  # old row: buffer 0.5 * 1 + 1 = 1.5; new row: buffer 1
    np.testing.assert_array_equal(model.w.detach().numpy(), [[-2.5, -2.5], [-0.5, -0.5]])


def test_a_lora_layer_grown_while_a_graph_is_alive_gets_gradients_of_its_new_shape():
    """The reason for replacing, not resizing: autograd keeps a parameter's shape in its accumulator."""
    from clpeft.components.lora import LoRALinear

    layer = LoRALinear(torch.nn.Linear(6, 5), rank=1, alpha=1.0)
    x = torch.randn(7, 6)
    loss = layer(x).sum()
    loss.backward()  # `loss` keeps the graph and the accumulators alive, as a training loop does
    layer.grow(2)
    with torch.no_grad():
        layer.lora_B.normal_()
    layer(x).square().sum().backward()
    a, b = layer.lora_A.detach().requires_grad_(), layer.lora_B.detach().requires_grad_()
    (layer.base_layer(x) + x @ a.T @ b.T * layer.scaling).square().sum().backward()
    torch.testing.assert_close(layer.lora_A.grad, a.grad)
    torch.testing.assert_close(layer.lora_B.grad, b.grad)


def test_zero_padded_returns_a_state_that_already_fits_without_copying():
    state = torch.ones(2, 3)
    assert zero_padded(state, torch.empty(2, 3)) is state
    assert zero_padded(state, torch.empty(2, 3), torch.float64) is not state  # another dtype: a copy
