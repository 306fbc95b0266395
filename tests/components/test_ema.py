"""EMATeacher and DualTeacher against hand-computed moving averages."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from clpeft.components.regularization.ema import DualTeacher, EMATeacher


def _net(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))


def _perturb(model: nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g))


def _params64(model: nn.Module) -> dict[str, np.ndarray]:
    return {n: p.detach().double().numpy().copy() for n, p in model.named_parameters()}


def test_update_is_the_ema_formula_by_hand():
    student = _net()
    teacher = EMATeacher(student, momentum=0.9)
    expected = _params64(student)
    for step in range(3):
        _perturb(student, step)
        s = _params64(student)
        expected = {n: 0.9 * expected[n] + 0.1 * s[n] for n in expected}  # theta_t <- m theta_t + (1-m) theta_s
        teacher.update(student)
    for n, p in teacher.model.named_parameters():
        np.testing.assert_allclose(p.double().numpy(), expected[n], rtol=1e-6, atol=1e-6)
        assert not p.requires_grad
    assert int(teacher.num_updates) == 3
    # a concrete element, worked out: 0.9 * a + 0.1 * b for a single step
    one = EMATeacher(nn.Linear(1, 1, bias=False), momentum=0.75)
    one.model.weight.data.fill_(2.0)
    s = nn.Linear(1, 1, bias=False)
    s.weight.data.fill_(6.0)
    one.update(s)
    assert one.model.weight.item() == 0.75 * 2.0 + 0.25 * 6.0 == 3.0


def test_warmup_ramp_is_mean_teacher_min_formula():
    student = _net()
    teacher = EMATeacher(student, momentum=0.8, warmup=True)
    assert teacher.current_momentum() == 0.0  # first update copies the student
    _perturb(student, 1)
    teacher.update(student)
    for (_, t), (_, s) in zip(teacher.model.named_parameters(), student.named_parameters()):
        assert torch.equal(t, s)
    assert teacher.current_momentum() == pytest.approx(0.5)  # 1 - 1/2
    teacher.update(student)
    assert teacher.current_momentum() == pytest.approx(2 / 3)
    for _ in range(10):
        teacher.update(student)
    assert teacher.current_momentum() == 0.8  # capped at alpha


def test_buffers_copy_ema_keep():
    student = _net()
    student.train()
    student(torch.randn(16, 3))  # moves BatchNorm running statistics
    s_mean = student[1].running_mean.clone()
    base = _net()
    for mode, expected in [("copy", s_mean), ("ema", 0.5 * base[1].running_mean + 0.5 * s_mean), ("keep", base[1].running_mean)]:
        teacher = EMATeacher(base, momentum=0.5, buffers=mode)
        teacher.update(student)
        torch.testing.assert_close(teacher.model[1].running_mean, expected)
        assert int(teacher.model[1].num_batches_tracked) == (1 if mode != "keep" else 0)


def test_teacher_stays_frozen_and_in_eval_mode():
    teacher = EMATeacher(_net(), momentum=0.9)
    holder = nn.Module()
    holder.teacher = teacher
    holder.train()
    assert not teacher.model.training
    assert all(not p.requires_grad for p in teacher.parameters())
    x = torch.randn(5, 3)
    torch.testing.assert_close(teacher(x), teacher.model(x))


def test_state_dict_round_trip_keeps_weights_and_ramp():
    student = _net()
    src = EMATeacher(student, momentum=0.9, warmup=True)
    for step in range(4):
        _perturb(student, step)
        src.update(student)
    dst = EMATeacher(_net(seed=5), momentum=0.9, warmup=True)
    dst.load_state_dict(src.state_dict())
    x = torch.randn(6, 3)
    assert torch.equal(dst(x), src(x))
    assert dst.current_momentum() == src.current_momentum()
    _perturb(student, 9)
    src.update(student)
    dst.update(student)
    assert torch.equal(dst(x), src(x))


def test_mismatched_student_is_refused():
    teacher = EMATeacher(_net(), momentum=0.9)
    with pytest.raises(ValueError):
        teacher.update(nn.Linear(3, 2))


def test_dual_teacher_updates_only_the_teacher_on_duty_and_switches_each_period():
    student = _net()
    dual = DualTeacher(student, momentum=0.9, period=2)
    history = []
    for step in range(6):
        _perturb(student, step)
        on_duty = dual.active
        before_other = _params64(dual.teachers[1 - on_duty].model)
        dual.update(student)
        history.append(on_duty)
        after_other = _params64(dual.teachers[1 - on_duty].model)
        for n in before_other:  # the idle teacher is untouched
            assert np.array_equal(before_other[n], after_other[n])
    assert history == [0, 0, 1, 1, 0, 0]
    assert dual.active == 1
    # teacher 0's last shift (steps 4, 5) restarted its ramp: step 4 copied the student, step 5
    # took 1 - 1/2 = 0.5 of the student after step 5
    replay = _net()
    for step in range(5):
        _perturb(replay, step)
    after4 = _params64(replay)
    after5 = _params64(student)
    for n, p in dual.teachers[0].model.named_parameters():
        np.testing.assert_allclose(p.double().numpy(), 0.5 * after4[n] + 0.5 * after5[n], rtol=1e-6, atol=1e-6)


def test_dual_teacher_forward_uses_the_teacher_on_duty_and_round_trips():
    student = _net()
    dual = DualTeacher(student, momentum=0.9, period=None)
    _perturb(student, 0)
    dual.update(student)
    dual.switch()
    x = torch.randn(4, 3)
    assert torch.equal(dual(x), dual.teachers[1](x))
    assert not torch.equal(dual(x), dual.teachers[0](x))
    restored = DualTeacher(_net(3), momentum=0.9, period=None)
    restored.load_state_dict(dual.state_dict())
    assert restored.active == 1 and torch.equal(restored(x), dual(x))
