"""Plain fine-tuning: the lower bound every continual-learning method must beat.

Trains on each experience in turn with cross-entropy and nothing against forgetting (Avalanche
calls it ``Naive``; training equals it, ``tests/reference/test_avalanche_baselines.py``). With a
frozen backbone this is a linear probe trained class-incrementally.
"""

from clpeft.registry import register_strategy
from clpeft.strategy import Strategy


@register_strategy("finetune")
class Finetune(Strategy):
    """Fine-tune on each experience in turn, no protection against forgetting (lower bound)."""
