"""Built-in merge methods; importing this package registers them (one module per method)."""

from clpeft.merging.methods import adamerging, dare, karcher, linear, mean, model_stock, multislerp, nuslerp, slerp, task_arithmetic, ties  # noqa: F401
