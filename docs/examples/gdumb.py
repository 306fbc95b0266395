"""GDumb as a plug-in: a class-balanced memory, and a model retrained from scratch on it alone.

Prabhu et al., "GDumb: A Simple Approach that Questions Our Progress in Continual Learning",
ECCV 2020: the sampler keeps the
memory balanced over the classes seen (here ``ReplayBuffer``'s ``class_balanced`` policy, a
random subset per class), and before every evaluation the learner is reset to its initial weights
and trained only on the memory. Two hooks do it: ``train_data`` returns the memory, and
``before_experience`` restores the initial weights.

Run it from YAML: ``strategy: {name: docs/examples/gdumb.py:GDumb, mem_size: 200}``.
"""

from __future__ import annotations

import copy

from clpeft import Strategy
from clpeft.components import LinearHead, ReplayBuffer


class GDumb(Strategy):
    """Train from the initial weights on a class-balanced memory only, every experience.

    Args:
        mem_size: samples the memory keeps (split equally over the classes seen).
    """

    def __init__(self, backbone, mem_size: int = 200):
        super().__init__(backbone)
        self.memory = ReplayBuffer(mem_size, "class_balanced")
        self.initial = copy.deepcopy(self.backbone.state_dict())

    def before_experience(self, exp):
        self.backbone.load_state_dict(self.initial)  # "dumb": nothing learned before survives ...
        self.head = LinearHead(self.backbone.feature_dim)
        super().before_experience(exp)
        self.memory.update(exp)  # draws from torch's generator, seeded per experience

    def train_data(self, exp):
        return self.memory.view((*exp.past, exp))  # ... but what the memory keeps
