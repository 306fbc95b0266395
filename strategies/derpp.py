"""Dark Experience Replay++ (DER++), and DER with ``beta: 0``.

Buzzega et al., "Dark Experience for General Continual Learning: a Strong, Simple Baseline",
NeurIPS 2020 (https://arxiv.org/abs/2004.07211). A reservoir memory keeps samples with the
logits the network gave them when they were seen (:class:`~clpeft.components.memory.logits.LogitsStore`);
the loss of an incoming batch is its cross-entropy plus ``alpha`` times the mean squared error
between the current and stored logits of one replayed batch (eq. 5) plus ``beta`` times the
cross-entropy of a second, independently drawn replayed batch (eq. 6). With ``beta: 0`` the second
batch is not drawn: that is DER (Mammoth's ``der``). The stored logits are those of the incoming
batch before the step (of its augmented inputs when ``train.augment`` is on), as in Mammoth.
With a growing head the distillation covers the logits each sample was stored with (see
:mod:`clpeft.components.memory.logits`). Equal to Mammoth's ``derpp`` and ``der`` step by step:
``tests/reference/test_mammoth_replay.py``. Defaults: Mammoth's best arguments for
Seq-CIFAR-10 with a 200-sample buffer (``alpha`` 0.1, ``beta`` 0.5, replayed batch 32).

Paper symbols: ``alpha`` -> ``alpha``, ``beta`` -> ``beta``, memory ``M`` -> ``mem_size``.
"""

from typing import Annotated

import torch
import torch.nn.functional as F
from pydantic import Field

from clpeft.components import ReplayBuffer
from clpeft.components.memory.logits import LogitsStore
from clpeft.data import Batch
from clpeft.distributed import require_one_process
from clpeft.registry import register_strategy
from clpeft.strategy import Strategy


@register_strategy("derpp")
class DERpp(Strategy):
    """DER++: replay a reservoir memory's logits (MSE) and labels (cross-entropy) (Buzzega et al. 2020).

    Args:
        backbone: the feature extractor.
        mem_size: reservoir memory ``M`` in samples.
        minibatch_size: samples in each replayed batch.
        alpha: weight ``alpha`` of the logit-matching term.
        beta: weight ``beta`` of the replayed cross-entropy; 0 is DER.
    """

    supported_scenarios = ("class_incremental", "domain_incremental", "few_shot_class_incremental")

    def __init__(
        self,
        backbone,
        mem_size: Annotated[int, Field(ge=0)] = 200,
        minibatch_size: Annotated[int, Field(ge=1)] = 32,
        alpha: Annotated[float, Field(ge=0)] = 0.1,
        beta: Annotated[float, Field(ge=0)] = 0.5,
    ):
        require_one_process(
            "derpp",
            "each rank would offer its share of a batch to its own reservoir with its own draws, so the ranks' memories would differ",
        )
        super().__init__(backbone)
        self.memory = ReplayBuffer(mem_size, "reservoir")
        self.logits = LogitsStore(mem_size)
        self.minibatch_size = minibatch_size
        self.alpha = alpha
        self.beta = beta

    def training_step(self, batch: Batch) -> torch.Tensor:
        outputs = self.predict(batch.x)
        loss = F.cross_entropy(outputs, batch.y)
        if len(self.memory):
            slots = self.memory.draw(self.minibatch_size)
            loss = loss + self.alpha * self.logits.mse(slots, self.predict(self._replayed(slots).x))
            if self.beta:
                replayed = self._replayed(self.memory.draw(self.minibatch_size))
                loss = loss + self.beta * F.cross_entropy(self.predict(replayed.x), replayed.y)
        self.logits.write(self.memory.add(self.experience, batch.index, batch.y), outputs)
        return loss

    def _replayed(self, slots: torch.Tensor) -> Batch:
        """The samples in ``slots`` as one batch, in that order."""
        view = self.memory.at(slots, (*self.experience.past, self.experience))
        return next(iter(self.batches(view, batch_size=len(view))))
