"""What iCaRL, WA and BiC share: an exemplar memory trained on with the new data, and the model of
the previous experience as a teacher.

Rebuffi et al., "iCaRL", CVPR 2017 (https://arxiv.org/abs/1611.07725), Alg. 2-5: each experience
trains on its data plus the memory, with the outputs of the model frozen at its start as targets on
the old classes; afterwards the memory is updated (herding on the current features by default).
WA (Zhao et al., CVPR 2020) and BiC (Wu et al., CVPR 2019) keep this and change the loss and the
classifier. The strategy calls :meth:`start` before its head grows, trains on :meth:`data`, gets
its logits and the teacher's from :meth:`outputs`, and calls :meth:`finish` after training.
"""

from __future__ import annotations

import torch
from torch import nn

from clpeft.components.heads.nearest_mean_of_exemplars import labelled_features
from clpeft.components.memory.replay import Policy, ReplayBuffer
from clpeft.components.regularization.previous_model import PreviousModel
from clpeft.data import Batch, DataView
from clpeft.experience import Experience


class ExemplarDistillation(nn.Module):
    """An exemplar memory (in the ``state_dict``) and the previous model (rebuilt every experience).

    Args:
        mem_size: memory capacity in samples.
        policy: the :class:`~clpeft.components.ReplayBuffer` policy (iCaRL's ``herding`` by default).
    """

    def __init__(self, mem_size: int, policy: Policy = "herding"):
        super().__init__()
        self.memory = ReplayBuffer(mem_size, policy)
        self.teacher: PreviousModel | None = None

    def start(self, strategy) -> None:
        """Freeze ``strategy`` (a :class:`clpeft.Strategy`) as the teacher; call before its head grows."""
        self.teacher = PreviousModel.of(strategy)

    def data(self, exp: Experience) -> DataView:
        """The experience's training data plus the memory."""
        return exp.train + self.memory.view(exp.past)

    def outputs(self, strategy, batch: Batch) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``strategy``'s head logits of the batch, and the teacher's (``None`` in the first experience)."""
        features = strategy.embed(batch.x)
        logits = strategy.head(features)
        return logits, None if self.teacher is None else self.teacher(batch.x, features)

    @property
    def n_old(self) -> int:
        """Classes the teacher knew (0 in the first experience)."""
        return 0 if self.teacher is None else self.teacher.head.n_classes

    def finish(self, strategy, exp: Experience) -> None:
        """Drop the teacher and offer ``exp`` to the memory (herding: on ``strategy``'s current features)."""
        self.teacher = None
        features = None
        if self.memory.policy == "herding":
            features = labelled_features(strategy.batches(exp.train), strategy.embed, strategy.backbone.feature_dim)[0]
        self.memory.update(exp, features=features)
