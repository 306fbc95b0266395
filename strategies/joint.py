"""Joint training on everything seen so far: the usual upper bound.

At experience ``i`` the model trains on the union of the training data of experiences
``0..i`` (the "cumulative" upper bound of Avalanche and Mammoth's ``joint``; training equals
Avalanche's ``Cumulative``, ``tests/reference/test_avalanche_baselines.py``), so row ``i`` of the
accuracy matrix is what a non-continual learner reaches on the same classes.
"""

from clpeft.data import DataView
from clpeft.experience import Experience
from clpeft.registry import register_strategy
from clpeft.strategy import Strategy


@register_strategy("joint")
class Joint(Strategy):
    """Train on the union of all experiences seen so far (upper bound, not continual)."""

    def train_data(self, exp: Experience) -> DataView:
        view = DataView([])
        for e in (*exp.past, exp):
            view = view + e.train
        return view
