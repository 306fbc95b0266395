"""What a learner keeps of past data: replay buffers of positions (reservoir, class-balanced, herding)."""

from clpeft.components.memory.extended_logits import ExtendedLogitsMemory, update_logits
from clpeft.components.memory.logits import LogitsStore
from clpeft.components.memory.replay import ReplayBuffer

__all__ = [
    "ExtendedLogitsMemory",
    "LogitsStore",
    "ReplayBuffer",
    "update_logits",
]
