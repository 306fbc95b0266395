"""Experience replay with the asymmetric cross-entropy (ER-ACE).

Caccia et al., "New Insights on Reducing Abrupt Representation Change in Online Continual
Learning", ICLR 2022 (https://arxiv.org/abs/2104.05025), eq. 3: the incoming batch's
cross-entropy is taken over the classes present in it (the logits of the other classes already
seen are masked out), so new classes do not push the old ones' logits down; a batch replayed from
a reservoir memory adds its cross-entropy over every class. As the official code and Mammoth's
``er_ace``: the classes from the largest label met so far upwards stay unmasked, mask and replay
start with the second experience (``task_free`` starts them at once), the memory is offered each
incoming batch after the step's loss, and the classifier is cosine with scale 10 (``head:
cosine``; Mammoth adds 1e-5 to the norms, clpeft's :class:`~clpeft.components.CosineHead` does
not). Equal to Mammoth's ``er_ace`` step by step: ``tests/reference/test_mammoth_replay.py``.

Paper symbols: memory ``M`` -> ``mem_size``, replayed batch size -> ``minibatch_size``.
"""

from typing import Annotated, Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from clpeft.components import CosineHead, ReplayBuffer
from clpeft.data import Batch
from clpeft.distributed import require_one_process
from clpeft.registry import register_strategy
from clpeft.strategy import Strategy

#: The cosine classifier's fixed scale (``scale_factor`` of the official code and Mammoth).
COSINE_SCALE = 10.0


@register_strategy("er_ace")
class ERACE(Strategy):
    """ER-ACE: asymmetric cross-entropy on the incoming batch, plain cross-entropy on a replayed one (Caccia et al. 2022).

    Args:
        backbone: the feature extractor.
        mem_size: reservoir memory ``M`` in samples.
        minibatch_size: samples replayed with every incoming batch.
        task_free: mask and replay from the first experience on (no task boundaries).
        head: the official ``cosine`` classifier (scale 10) or a ``linear`` one.
    """

    supported_scenarios = ("class_incremental", "domain_incremental", "few_shot_class_incremental")

    def __init__(
        self,
        backbone,
        mem_size: Annotated[int, Field(ge=0)] = 200,
        minibatch_size: Annotated[int, Field(ge=1)] = 32,
        task_free: bool = False,
        head: Literal["cosine", "linear"] = "cosine",
    ):
        require_one_process(
            "er_ace",
            "each rank would offer its share of a batch to its own reservoir with its own draws, so the ranks' memories would differ",
        )
        super().__init__(backbone)
        if head == "cosine":
            self.head = CosineHead(backbone.feature_dim, scale=COSINE_SCALE, learn_scale=False)
        self.memory = ReplayBuffer(mem_size, "reservoir")
        self.minibatch_size = minibatch_size
        self.task_free = task_free
        self.register_buffer("largest_seen", torch.tensor(-1))  # the largest label of an incoming batch so far

    def training_step(self, batch: Batch) -> torch.Tensor:
        logits = self.predict(batch.x)
        present = batch.y.unique()
        self.largest_seen.fill_(max(int(self.largest_seen), int(present.max())))
        asymmetric = self.task_free or self.experience.index > 0
        if asymmetric:
            kept = torch.zeros(logits.shape[1], dtype=torch.bool, device=logits.device)
            kept[present] = True
            kept[int(self.largest_seen) :] = True
            logits = logits.masked_fill(~kept, torch.finfo(logits.dtype).min)
        loss = F.cross_entropy(logits, batch.y)
        if asymmetric and len(self.memory):
            view = self.memory.sample(self.minibatch_size, (*self.experience.past, self.experience))
            replayed = next(iter(self.batches(view, batch_size=len(view))))
            loss = loss + F.cross_entropy(self.predict(replayed.x), replayed.y)
        self.memory.add(self.experience, batch.index, batch.y)
        return loss
