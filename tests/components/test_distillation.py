"""Tests for ``clpeft.components.regularization.distillation``.

Reference: Li & Hoiem (LwF, 2016), eq. 2, after Hinton et al. (2015), section 2: the old-task
loss is the KL divergence between the temperature-``T`` softmaxes of teacher and student (no
``T^2`` factor, as in the paper, Avalanche and Mammoth); its gradient with respect to the student
logits is ``(softmax(s/T) - softmax(t/T)) / T`` per sample.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from clpeft.components.regularization.distillation import distillation_loss, frozen_copy


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _reference(student: np.ndarray, teacher: np.ndarray, T: float) -> float:
    """mean_b sum_c q_c (log q_c - log p_c), float64, written out by hand."""
    n = teacher.shape[1]
    q = _softmax(teacher / T)
    p = _softmax(student[:, :n] / T)
    kl_per_row = (q * (np.log(q) - np.log(p))).sum(axis=1)
    return float(kl_per_row.mean())


@pytest.mark.parametrize("T", [0.5, 1.0, 2.0, 4.0])
def test_equals_numpy_kl(T):
    g = torch.Generator().manual_seed(0)
    s = torch.randn(9, 5, generator=g) * 3
    t = torch.randn(9, 5, generator=g) * 3
    got = distillation_loss(s, t, T)
    assert got.shape == ()
    np.testing.assert_allclose(got.item(), _reference(s.double().numpy(), t.double().numpy(), T), rtol=1e-5, atol=1e-7)


def test_hand_worked_two_class_example():
    # one sample, T = 1: teacher probabilities (0.5, 0.5), student logits (0, ln 3) -> (1/4, 3/4)
    # KL = 0.5 ln(0.5/0.25) + 0.5 ln(0.5/0.75) = 0.5 ln 2 + 0.5 ln(2/3) = 0.5 ln(4/3)
    s = torch.tensor([[0.0, float(np.log(3.0))]])
    t = torch.tensor([[1.0, 1.0]])
    assert distillation_loss(s, t, 1.0).item() == pytest.approx(0.5 * np.log(4 / 3), rel=1e-6)
    # T = 2 scales the logits by 1/2 (and nothing else): student (0, ln 3 / 2) -> (1/(1+sqrt3), sqrt3/(1+sqrt3))
    p1 = 1 / (1 + np.sqrt(3))
    kl = 0.5 * np.log(0.5 / p1) + 0.5 * np.log(0.5 / (1 - p1))
    assert distillation_loss(s, t, 2.0).item() == pytest.approx(kl, rel=1e-6)


def test_grown_student_is_compared_on_the_teacher_classes_only():
    g = torch.Generator().manual_seed(1)
    t = torch.randn(6, 3, generator=g)
    s_old = torch.randn(6, 3, generator=g)
    s_grown = torch.cat([s_old, 100 * torch.randn(6, 4, generator=g)], dim=1)
    assert torch.equal(distillation_loss(s_grown, t, 2.0), distillation_loss(s_old, t, 2.0))
    np.testing.assert_allclose(
        distillation_loss(s_grown, t, 2.0).item(), _reference(s_grown.double().numpy(), t.double().numpy(), 2.0), rtol=1e-5
    )


def test_zero_iff_student_matches_teacher_up_to_a_shift():
    g = torch.Generator().manual_seed(2)
    t = torch.randn(4, 5, generator=g)
    assert distillation_loss(t.clone(), t, 3.0).abs().item() < 1e-6
    # softmax is shift-invariant per row
    assert distillation_loss(t + torch.randn(4, 1, generator=g), t, 3.0).abs().item() < 1e-6
    assert distillation_loss(t + 0.3 * torch.randn(4, 5, generator=g), t, 3.0).item() > 1e-4


def test_gradient_matches_the_softmax_difference_over_t():
    g = torch.Generator().manual_seed(3)
    B, T = 5, 2.5
    s = torch.randn(B, 4, generator=g, dtype=torch.float64, requires_grad=True)
    t = torch.randn(B, 4, generator=g, dtype=torch.float64)
    distillation_loss(s, t, T).backward()
    # d/ds [KL(q || softmax(s/T))] / B = (softmax(s/T) - q) / (T B)
    q = _softmax(t.numpy() / T)
    p = _softmax(s.detach().numpy() / T)
    np.testing.assert_allclose(s.grad.numpy(), (p - q) / (T * B), rtol=1e-5, atol=1e-7)


def test_half_precision_inputs_are_computed_in_float32():
    g = torch.Generator().manual_seed(4)
    s = torch.randn(8, 6, generator=g).to(torch.bfloat16)
    t = torch.randn(8, 6, generator=g).to(torch.bfloat16)
    got = distillation_loss(s, t, 2.0)
    assert got.dtype == torch.float32
    np.testing.assert_allclose(got.item(), _reference(s.double().numpy(), t.double().numpy(), 2.0), rtol=1e-5)


def test_frozen_copy_is_an_independent_frozen_eval_module():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.5), nn.Linear(4, 2)).train()
    teacher = frozen_copy(model)
    assert not teacher.training and all(not m.training for m in teacher.modules())
    assert all(not p.requires_grad for p in teacher.parameters())
    assert model.training and all(p.requires_grad for p in model.parameters())  # original untouched
    x = torch.randn(10, 3)
    before = teacher(x)
    assert torch.equal(before, teacher(x))  # eval mode: dropout is off, output is deterministic
    with torch.no_grad():
        model[0].weight.add_(1.0)
    assert torch.equal(teacher(x), before)  # a deep copy: training the student leaves it alone
