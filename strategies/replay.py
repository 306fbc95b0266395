"""Experience replay with a fixed-size memory.

Chaudhry et al., "On Tiny Episodic Memories in Continual Learning", 2019
(https://arxiv.org/abs/1902.10486); Rebuffi et al., iCaRL, 2017, for class-balanced memories.
Each experience trains on its own data concatenated with the memory; after the experience the
memory is updated with the :class:`~clpeft.components.ReplayBuffer` policy.

Paper symbols: memory size ``M`` -> ``mem_size``.
"""

from typing import Annotated, Literal

from pydantic import Field

from clpeft.components import ReplayBuffer
from clpeft.data import DataView
from clpeft.experience import Experience
from clpeft.registry import register_strategy
from clpeft.strategy import Strategy


@register_strategy("replay")
class Replay(Strategy):
    """Experience replay: train on new data plus a fixed-size memory of past samples (Chaudhry et al. 2019).

    Args:
        backbone: the feature extractor.
        mem_size: memory capacity ``M`` in samples.
        policy: ``reservoir`` sampling or a ``class_balanced`` memory.
    """

    def __init__(
        self,
        backbone,
        mem_size: Annotated[int, Field(ge=0)] = 200,
        policy: Literal["reservoir", "class_balanced"] = "reservoir",
    ):
        super().__init__(backbone)
        self.buffer = ReplayBuffer(mem_size, policy)

    def train_data(self, exp: Experience) -> DataView:
        return exp.train + self.buffer.view(exp.past)

    def after_experience(self, exp: Experience) -> None:
        self.buffer.update(exp)
