"""Continual-learning methods (installed as ``clpeft.strategies``); importing this registers them."""

from clpeft.strategies import ewc, finetune, joint, lwf, replay  # noqa: F401
