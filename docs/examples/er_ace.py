"""ER-ACE as a plug-in: experience replay with the asymmetric cross-entropy.

Caccia et al., "New Insights on Reducing Abrupt Representation Change in Online Continual
Learning", ICLR 2022, eq. 3: the incoming batch's
cross-entropy is taken over the classes present in that batch only (logits of other classes
masked), so new classes do not push old ones' logits down; the replayed batch's over every class
seen. The memory is a reservoir over the stream, offered each batch as it is trained on.

Run it from YAML: ``strategy: {name: docs/examples/er_ace.py:ERACE, mem_size: 200}``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from clpeft import Strategy
from clpeft.components import ReplayBuffer


class ERACE(Strategy):
    """ER-ACE: asymmetric cross-entropy on the incoming batch, plain cross-entropy on a replayed one.

    Args:
        mem_size: samples the reservoir keeps.
        replay_batch: samples replayed with every incoming batch.
    """

    def __init__(self, backbone, mem_size: int = 200, replay_batch: int = 32):
        super().__init__(backbone)
        self.memory = ReplayBuffer(mem_size, "reservoir")
        self.replay_batch = replay_batch  # draws come from torch's generator, which the engine seeds per experience

    def before_experience(self, exp):
        super().before_experience(exp)
        self.current = exp

    def training_step(self, batch):
        logits = self.predict(batch.x)
        present = torch.zeros(logits.shape[1], dtype=torch.bool, device=logits.device)
        present[batch.y.unique()] = True
        loss = F.cross_entropy(logits.masked_fill(~present, torch.finfo(logits.dtype).min), batch.y)
        if len(self.memory):
            view = self.memory.sample(self.replay_batch, (*self.current.past, self.current))
            replayed = next(iter(self.batches(view, batch_size=len(view))))
            loss = loss + F.cross_entropy(self.predict(replayed.x), replayed.y)
        self.memory.add(self.current, batch.index, batch.y)
        return loss
