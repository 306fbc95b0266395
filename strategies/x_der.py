"""eXtended Dark Experience Replay (X-DER).

Boschini, Bonicelli, Buzzega, Porrello & Calderara, "Class-Incremental Continual Learning into the
eXtended DER-verse", TPAMI 2022 (https://arxiv.org/abs/2201.00766). DER++'s replay of stored logits
(MSE, weight ``alpha``) and labels (cross-entropy over the past classes only, weight ``beta``), with
the incoming batch's cross-entropy taken over the current experience's classes alone, and a memory
whose logits are rewritten (:mod:`clpeft.components.memory.extended_logits`): a new sample's logits
of past classes are capped at ``gamma`` times its own class's when it is stored (Sec. 4.1), an old
sample's logits of the classes learnt after it are filled in from the current model when a task
ends and, with probability ``1 / n`` on its ``n``-th replay, while it trains (Sec. 4.2).

Equal to Mammoth's ``models/xder.py`` step by step (losses, memory slots and logits, parameters:
``tests/reference/test_mammoth_lucir_xder.py``) with these parts left out, and why:

* the future-heads preparation (Sec. 4.3: the SupCon consistency loss ``lambd`` on the future
  heads' outputs of strongly augmented images, and the future-logits constraint ``constr_eta``):
  clpeft's heads grow with the classes seen, so there are no future heads to prepare (Mammoth's
  network has every class's output from the start); the SupCon loss also needs image
  augmentations of raw inputs, which cached features of a frozen backbone do not have;
* the past-logits constraint and the distance-preserving loss: off in Mammoth's defaults;
* ``align_bn`` (BatchNorm statistics of the replayed batch mixed with incoming samples): networks
  without BatchNorm are unaffected; clpeft forwards each batch alone.

The memory is filled from a shuffled pass over the experience without augmentation (Mammoth: its
augmented training loader). Mammoth requires ``alpha`` and ``beta``; the defaults are DER++'s (Mammoth's
best DER++ arguments for Seq-CIFAR-10), a starting point rather than tuned X-DER values; ``gamma``
is Mammoth's default.

Paper symbols: ``alpha``, ``beta``, ``gamma`` -> same names; memory ``M`` -> ``mem_size``.
"""

from typing import Annotated

import torch
import torch.nn.functional as F
from pydantic import Field

from clpeft.components.memory.extended_logits import ExtendedLogitsMemory, update_logits
from clpeft.data import Batch
from clpeft.distributed import require_one_process
from clpeft.errors import UserError
from clpeft.experience import Experience
from clpeft.registry import register_strategy
from clpeft.strategy import Strategy


@register_strategy("x_der")
class XDER(Strategy):
    """X-DER: DER++ with a memory whose logits are rewritten for the classes learnt later (Boschini et al. 2022).

    Args:
        backbone: the feature extractor.
        mem_size: memory ``M`` in samples.
        minibatch_size: samples in each replayed batch.
        alpha: weight ``alpha`` of the logit-matching term.
        beta: weight ``beta`` of the replayed cross-entropy over the past classes.
        gamma: ``gamma``, the cap of the rewritten logits relative to a sample's own class's.
    """

    supported_scenarios = ("class_incremental",)

    def __init__(
        self,
        backbone,
        mem_size: Annotated[int, Field(ge=1)] = 200,
        minibatch_size: Annotated[int, Field(ge=1)] = 32,
        alpha: Annotated[float, Field(ge=0)] = 0.1,
        beta: Annotated[float, Field(ge=0)] = 0.5,
        gamma: Annotated[float, Field(gt=0)] = 0.85,
    ):
        require_one_process(
            "x_der",
            "each rank would rewrite the memory's logits from its own replayed batches with its own draws, so the ranks' memories would differ",
        )
        super().__init__(backbone)
        self.memory = ExtendedLogitsMemory(mem_size)
        self.minibatch_size = minibatch_size
        self.alpha = alpha
        self.beta = beta
        self.gamma = gamma
        self.n_past = 0

    def before_experience(self, exp: Experience) -> None:
        super().before_experience(exp)
        self.n_past = exp.past[-1].n_classes_seen if exp.past else 0
        if sorted(exp.classes_in_this_experience) != list(range(self.n_past, exp.n_classes_seen)):
            raise UserError(
                f"x_der needs each experience to bring the next label ids (experience {exp.index} brings "
                f"{exp.classes_in_this_experience} after {self.n_past} classes); use a class_incremental scenario",
                key="strategy.name",
            )
        self.memory.replays.zero_()

    def training_step(self, batch: Batch) -> torch.Tensor:
        outputs = self.predict(batch.x)
        loss = F.cross_entropy(outputs[:, self.n_past : self.experience.n_classes_seen], batch.y - self.n_past)
        if len(self.memory):
            first = self.memory.buffer.draw(self.minibatch_size)
            first_outputs = self.predict(self._replayed(first).x)
            loss = loss + self.alpha * self.memory.logits.mse(first, first_outputs)
            second = self.memory.buffer.draw(self.minibatch_size)
            second_outputs = self.predict(self._replayed(second).x)
            loss = loss + self.beta * F.cross_entropy(second_outputs[:, : self.n_past], self.memory.labels[second].to(outputs.device))
            slots, first_seen = _distinct(torch.cat([first, second]))
            chosen = self.memory.replayed(slots, self.n_past)
            replayed_outputs = torch.cat([first_outputs, second_outputs]).detach()[first_seen]
            self.memory.rewrite(chosen, replayed_outputs[torch.isin(slots, chosen)], self.n_past, self.gamma)
        return loss

    @torch.no_grad()
    def after_experience(self, exp: Experience) -> None:
        if self.n_past:
            self.memory.keep_first(self.memory.buffer.capacity // exp.n_classes_seen)
        quota = self.memory.quotas(len(exp.classes_in_this_experience))
        for batch in self.batches(exp.train, shuffle=True):
            outputs = self.predict(batch.x).float()
            if not quota.any():
                break
            if self.n_past:
                outputs = update_logits(outputs, outputs, batch.y, 0, self.n_past, self.gamma)
            taken = []
            for j, label in enumerate(batch.y.tolist()):
                if quota[label - self.n_past] > 0:
                    taken.append(j)
                    quota[label - self.n_past] -= 1
            taken = torch.tensor(taken, dtype=torch.long)
            self.memory.append(exp, batch.index[taken], batch.y.cpu()[taken], outputs.cpu()[taken])
        old = torch.nonzero(self.memory.labels < self.n_past).flatten()
        if len(old):
            outputs = torch.cat([self.predict(b.x) for b in self.batches(self.memory.buffer.at(old, (*exp.past, exp)))])
            self.memory.rewrite(old, outputs, self.n_past, self.gamma)

    def _replayed(self, slots: torch.Tensor) -> Batch:
        """The samples in ``slots`` as one batch, in that order."""
        view = self.memory.buffer.at(slots, (*self.experience.past, self.experience))
        return next(iter(self.batches(view, batch_size=len(view))))


def _distinct(slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The slots without repeats, in order of first appearance, and the positions of those first appearances."""
    first = [i for i, s in enumerate(slots.tolist()) if s not in slots[:i].tolist()]
    first = torch.tensor(first, dtype=torch.long)
    return slots[first], first
