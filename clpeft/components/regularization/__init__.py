"""What keeps a model near its past self: distillation from a frozen copy, EMA teachers, the EWC Fisher penalty."""

from clpeft.components.regularization.ema import DualTeacher, EMATeacher

__all__ = [
    "DualTeacher",
    "EMATeacher",
]
