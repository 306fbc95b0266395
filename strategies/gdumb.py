"""GDumb: a greedy balanced memory, and a learner retrained from scratch on it alone.

Prabhu et al., "GDumb: A Simple Approach that Questions Our Progress in Continual Learning",
ECCV 2020 (https://arxiv.org/abs/2007.07400). The sampler keeps a memory balanced over the
classes seen (``policy: class_balanced``, a uniform random subset of each class, the balance the
paper's greedy sampler keeps); before each evaluation the learner is reset and trained on the
memory only: ``before_experience`` adds the experience to the memory, restores the backbone's
initial weights (the pretrained ones, or the random initialisation of a CNN/MLP) and draws a
fresh head, and ``train_data`` is the memory. ``policy: reservoir`` is Mammoth's ``gdumb``
memory (a reservoir over the stream, equal slot by slot: ``tests/reference/test_mammoth_replay.py``,
which also checks the training on the memory against Mammoth's ``fit_buffer``). The memory is
filled before training, from the seed every rank shares, so ``torchrun`` gives one process's results.

How the memory is fitted is the run's ``train`` section. Mammoth fits once, after the last task,
for 256 epochs of SGD with a one-epoch warm-up at ``maxlr / 10`` then cosine warm restarts from
``maxlr`` 0.05 to ``minlr`` 5e-4, with CutMix; ``configs/baselines/digits_gdumb.yaml`` uses
``lr`` 0.05, SGD and a cosine schedule (clpeft has no warm-restart schedule and no CutMix yet).

Paper symbols: memory ``k`` -> ``mem_size``.
"""

from typing import Annotated, Literal

from pydantic import Field

from clpeft.components import LinearHead, ReplayBuffer
from clpeft.data import DataView
from clpeft.experience import Experience
from clpeft.registry import register_strategy
from clpeft.strategy import Strategy


@register_strategy("gdumb")
class GDumb(Strategy):
    """GDumb: train from the initial weights on a class-balanced memory only, every experience (Prabhu et al. 2020).

    Args:
        backbone: the feature extractor.
        mem_size: memory ``k`` in samples.
        policy: the paper's ``class_balanced`` memory or Mammoth's ``reservoir``.
    """

    supported_scenarios = ("class_incremental", "domain_incremental", "few_shot_class_incremental")

    def __init__(
        self, backbone, mem_size: Annotated[int, Field(ge=0)] = 200, policy: Literal["class_balanced", "reservoir"] = "class_balanced"
    ):
        super().__init__(backbone)
        self.memory = ReplayBuffer(mem_size, policy)
        # a frozen backbone never changes; a trainable one is reset to these weights
        self._initial = None if backbone.frozen else {k: v.detach().clone() for k, v in backbone.state_dict().items()}

    def before_experience(self, exp: Experience) -> None:
        self.memory.update(exp)  # draws from torch's generator, which the engine seeds per experience
        if self._initial is not None:
            self.backbone.load_state_dict(self._initial)
        self.head = LinearHead(self.backbone.feature_dim).to(self.device)
        super().before_experience(exp)

    def train_data(self, exp: Experience) -> DataView:
        return self.memory.view((*exp.past, exp))
