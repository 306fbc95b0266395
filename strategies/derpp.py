"""Dark Experience Replay++ (DER++), and DER with ``beta: 0``.

Buzzega et al., "Dark Experience for General Continual Learning: a Strong, Simple Baseline",
NeurIPS 2020 (https://arxiv.org/abs/2004.07211). A reservoir memory keeps samples with the
logits the network gave them when they were seen (:class:`~clpeft.components.memory.logits.LogitsStore`);
the loss of an incoming batch is its cross-entropy plus ``alpha`` times the mean squared error
between the current and stored logits of one replayed batch (eq. 5) plus ``beta`` times the
cross-entropy of a second, independently drawn replayed batch (eq. 6). With ``beta: 0`` the second
batch is not drawn: that is DER (Mammoth's ``der``). The stored logits are those of the incoming
batch before the step (of its augmented inputs when ``train.augment`` is on), as in Mammoth.
Mammoth's network has every class's output from the start: the cross-entropy of an incoming
batch pushes the classes still to come down, and the stored logits hold them, so DER keeps them
down afterwards; evaluation reads the seen classes' outputs only. ``head_classes: stream`` does
the same (the head covers the stream's classes from the first experience, :meth:`predict`
returns the seen ones); the Mammoth configs (``configs/baselines/cifar10_der*``, ``digits_derpp``)
set it. The default, ``head_classes: seen``, grows the head per experience as every other
clpeft strategy does; the distillation then covers the logits each sample was stored with (see
:mod:`clpeft.components.memory.logits`) and leaves the new classes' outputs free to rise over the
old ones. Which keeps more depends on the budget: on class-incremental digits DER (``alpha`` 1)
keeps 0.80 with Mammoth's head against 0.23 with a growing one, while DER++ with 5 epochs on a
small CNN forgets more with it (``tests/strategies/test_replay_methods.py``, ``benchmarks/RESULTS.md``). Equal to Mammoth's ``derpp`` and ``der`` step by step:
``tests/reference/test_mammoth_replay.py``. Defaults: Mammoth's best arguments for
Seq-CIFAR-10 with a 200-sample buffer (``alpha`` 0.1, ``beta`` 0.5, replayed batch 32).

Paper symbols: ``alpha`` -> ``alpha``, ``beta`` -> ``beta``, memory ``M`` -> ``mem_size``.
"""

from typing import Annotated, Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from clpeft.components import ReplayBuffer
from clpeft.components.memory.logits import LogitsStore
from clpeft.data import Batch
from clpeft.distributed import require_one_process
from clpeft.experience import Experience
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
        head_classes: the head's outputs: every class of the stream from the start (``stream``,
            Mammoth's network) or the classes seen so far (``seen``, clpeft's default).
    """

    supported_scenarios = ("class_incremental", "domain_incremental", "few_shot_class_incremental")

    def __init__(
        self,
        backbone,
        mem_size: Annotated[int, Field(ge=0)] = 200,
        minibatch_size: Annotated[int, Field(ge=1)] = 32,
        alpha: Annotated[float, Field(ge=0)] = 0.1,
        beta: Annotated[float, Field(ge=0)] = 0.5,
        head_classes: Literal["stream", "seen"] = "seen",
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
        self.head_classes = head_classes

    def before_experience(self, exp: Experience) -> None:
        super().before_experience(exp)
        if self.head_classes == "stream" and exp.classes_in_stream:
            self.head.grow_to(max(exp.classes_in_stream) + 1)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Logits over the classes seen so far (the head may hold the stream's later ones too)."""
        logits = self._logits(x)
        return logits if self.experience is None else logits[:, : self.experience.n_classes_seen]

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        """Every output of the head: what the losses and the stored logits use."""
        return self.head(self.embed(x))

    def training_step(self, batch: Batch) -> torch.Tensor:
        outputs = self._logits(batch.x)
        loss = F.cross_entropy(outputs, batch.y)
        if len(self.memory):
            slots = self.memory.draw(self.minibatch_size)
            loss = loss + self.alpha * self.logits.mse(slots, self._logits(self._replayed(slots).x))
            if self.beta:
                replayed = self._replayed(self.memory.draw(self.minibatch_size))
                loss = loss + self.beta * F.cross_entropy(self._logits(replayed.x), replayed.y)
        self.logits.write(self.memory.add(self.experience, batch.index, batch.y), outputs)
        return loss

    def _replayed(self, slots: torch.Tensor) -> Batch:
        """The samples in ``slots`` as one batch, in that order."""
        view = self.memory.at(slots, (*self.experience.past, self.experience))
        return next(iter(self.batches(view, batch_size=len(view))))
