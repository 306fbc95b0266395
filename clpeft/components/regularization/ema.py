"""Exponential-moving-average (mean) teachers.

Tarvainen & Valpola, "Mean teachers are better role models", NeurIPS 2017
(https://arxiv.org/abs/1703.01780), eq. 1: after every student step the teacher weights become

    theta'_t = alpha * theta'_{t-1} + (1 - alpha) * theta_t

(``alpha`` -> ``momentum``). The optional warm-up is the ramp of the Mean Teacher code,
``alpha_t = min(alpha, 1 - 1 / (t + 1))`` with ``t`` the number of earlier updates: the first
update copies the student and early updates average uniformly over the steps so far.

:class:`DualTeacher` follows Na et al., "Switching Temporary Teachers for Semi-Supervised
Semantic Segmentation", NeurIPS 2023 (https://arxiv.org/abs/2310.18640): two EMA teachers work
in shifts; only the teacher on duty produces targets and is updated, and its warm-up ramp
restarts at the start of each shift (the authors' ``update_ema`` ramps with the iteration
index inside the epoch), so each shift's teacher is a fresh, "temporary" average of the
student that is never coupled to it for long.
"""

from __future__ import annotations

import copy
from typing import Literal

import torch
from torch import nn


class EMATeacher(nn.Module):
    """A frozen copy of ``model`` that follows the student by an exponential moving average.

    Args:
        model: the student; the teacher starts as a deep copy of it.
        momentum: ``alpha`` in ``theta_t <- alpha * theta_t + (1 - alpha) * theta_s``.
        warmup: use the Mean Teacher ramp ``alpha_t = min(alpha, 1 - 1/(t + 1))``.
        buffers: what :meth:`update` does with floating-point buffers (BatchNorm running
            statistics): ``copy`` the student's (the default, as in the Mean Teacher code),
            ``ema`` them with the same momentum, or ``keep`` the teacher's own. Integer
            buffers (``num_batches_tracked``) are always copied.

    The teacher never requires gradients and stays in eval mode whatever its owner's mode.
    ``num_updates`` (the ``t`` of the ramp) is a buffer, so it is part of the ``state_dict``.
    """

    def __init__(self, model: nn.Module, momentum: float = 0.999, warmup: bool = False, buffers: Literal["copy", "ema", "keep"] = "copy"):
        super().__init__()
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum must lie in [0, 1], got {momentum}")
        self.momentum = float(momentum)
        self.warmup = bool(warmup)
        self.buffer_mode = buffers
        self.model = copy.deepcopy(model)
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.model.eval()
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))

    def current_momentum(self) -> float:
        """The ``alpha_t`` the next :meth:`update` uses."""
        if not self.warmup:
            return self.momentum
        return min(self.momentum, 1.0 - 1.0 / (int(self.num_updates) + 1))

    @torch.no_grad()
    def update(self, student: nn.Module) -> None:
        """One EMA step towards ``student`` (same architecture; parameters matched by name)."""
        m = self.current_momentum()
        teacher_params = dict(self.model.named_parameters())
        names = [n for n, _ in student.named_parameters()]
        if set(names) != set(teacher_params):
            raise ValueError(
                "the student's parameters differ from the teacher's; build a new EMATeacher "
                f"(or call reset) after changing the model: {sorted(set(names) ^ set(teacher_params))[:5]}"
            )
        pairs = [(teacher_params[n], p) for n, p in student.named_parameters()]
        for t, s in pairs:
            if t.shape != s.shape:
                raise ValueError(f"shape changed ({tuple(t.shape)} -> {tuple(s.shape)}); call reset(student)")
        targets = [t for t, _ in pairs]
        torch._foreach_mul_(targets, m)
        torch._foreach_add_(targets, [s.detach() for _, s in pairs], alpha=1.0 - m)
        self._update_buffers(student, m)
        self.num_updates += 1

    def _update_buffers(self, student: nn.Module, m: float) -> None:
        if self.buffer_mode == "keep":
            return
        own = dict(self.model.named_buffers())
        for name, b in student.named_buffers():
            t = own.get(name)
            if t is None or t.shape != b.shape:
                continue
            if self.buffer_mode == "ema" and t.is_floating_point():
                t.mul_(m).add_(b, alpha=1.0 - m)
            else:
                t.copy_(b)

    @torch.no_grad()
    def reset(self, student: nn.Module) -> None:
        """Become a fresh copy of ``student`` and restart the warm-up ramp."""
        self.model = copy.deepcopy(student).to(self.num_updates.device)
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.model.eval()
        self.num_updates.zero_()

    def restart_warmup(self) -> None:
        """Restart the ramp (``t = 0``) without touching the weights."""
        self.num_updates.zero_()

    def train(self, mode: bool = True) -> EMATeacher:
        super().train(mode)
        self.model.eval()
        return self

    def forward(self, *args, **kwargs):
        return self.model(*args, **kwargs)


class DualTeacher(nn.Module):
    """Two (or more) temporary EMA teachers that take turns (Na et al., NeurIPS 2023).

    Args:
        model: the student; every teacher starts as a copy of it.
        momentum: EMA momentum of the teacher on duty (0.99 in the authors' code).
        period: student updates per shift (one epoch in the paper); ``None`` switches only
            when :meth:`switch` is called.
        n_teachers: number of teachers in the rotation (2 in the paper).

    Shift ``k`` is served by teacher ``k mod n_teachers``. :meth:`update` moves only the teacher
    on duty, with the warm-up ramp ``min(alpha, 1 - 1/(t + 1))`` counted from the start of the
    shift, so its first update of a shift makes it a copy of the current student.
    """

    def __init__(self, model: nn.Module, momentum: float = 0.99, period: int | None = None, n_teachers: int = 2):
        super().__init__()
        if n_teachers < 1:
            raise ValueError("n_teachers must be at least 1")
        if period is not None and period < 1:
            raise ValueError("period must be a positive number of updates or None")
        self.period = period
        self.teachers = nn.ModuleList(EMATeacher(model, momentum, warmup=True) for _ in range(n_teachers))
        self.register_buffer("shift", torch.zeros((), dtype=torch.long))
        self.register_buffer("updates_in_shift", torch.zeros((), dtype=torch.long))

    @property
    def active(self) -> int:
        """Index of the teacher on duty."""
        return int(self.shift) % len(self.teachers)

    @property
    def teacher(self) -> EMATeacher:
        """The teacher on duty."""
        return self.teachers[self.active]

    def switch(self) -> None:
        """End the current shift: the next teacher takes over and restarts its ramp."""
        self.shift += 1
        self.updates_in_shift.zero_()
        self.teacher.restart_warmup()

    def reset(self, student: nn.Module) -> None:
        """Every teacher becomes a copy of ``student``; the rotation starts over with teacher 0."""
        for teacher in self.teachers:
            teacher.reset(student)
        self.shift.zero_()
        self.updates_in_shift.zero_()

    def update(self, student: nn.Module) -> None:
        """EMA-update the teacher on duty; switch teachers after ``period`` updates."""
        self.teacher.update(student)
        self.updates_in_shift += 1
        if self.period is not None and int(self.updates_in_shift) >= self.period:
            self.switch()

    def forward(self, *args, **kwargs):
        return self.teacher(*args, **kwargs)
