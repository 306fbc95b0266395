"""AdaNPC: test-time adaptation with a non-parametric (k-nearest-neighbour) classifier.

Zhang et al., "AdaNPC: Exploring Non-Parametric Classifier for Test-Time Adaptation", ICML 2023
(https://arxiv.org/abs/2304.12566). No parameter is updated and BatchNorm keeps its source
statistics. When adaptation begins, the memory is filled with the source model's features of
its training data and their labels (one shuffled pass). Each test batch is then classified by
the memory alone (:class:`~clpeft.components.tta.neighbour_memory.NeighbourMemory`):

    p_c(x) = sum_{i in N_k(z)} w_i [y_i = c],   w_i = softmax_{i in N_k(z)}(<z / |z|, m_i> / tau),   z = f(x),

and afterwards each test sample whose vote is confident, ``max_c p_c(x) >= beta``, enters the
memory as ``(z, argmax_c p_c(x))``: the memory drifts from the source towards the test
distribution. ``adapt`` returns ``log p`` as logits. The authors' code (``AdaNPC`` in
``domainbed/adapt_algorithms.py``) tests ``beta`` against ``softmax(p)`` instead; here the
confidence is the vote itself. ``memory_size`` bounds the memory first in, first out (the
authors' memory is unbounded, ``None`` here too).

Paper symbols: ``k`` -> ``k``, ``tau`` -> ``temperature``, ``beta`` -> ``threshold``; ``k`` and
``tau`` default to the authors' small-image values (``hparams_registry.py``: 10, 0.1).
"""

from typing import Annotated

import torch
from pydantic import Field

from clpeft.components.tta.adapting_strategy import AdaptingStrategy
from clpeft.components.tta.neighbour_memory import NeighbourMemory
from clpeft.components.tta.online_adaptation import classifier
from clpeft.components.tta.source_data import source_training_data
from clpeft.data import DataView
from clpeft.experience import Experience
from clpeft.registry import register_strategy

NO_SOURCE_DATA = "scenario.dataset (its training split fills AdaNPC's memory with the source features)"


@register_strategy("adanpc")
class AdaNPC(AdaptingStrategy):
    """AdaNPC: k-nearest-neighbour vote over a memory of source and confident test features (Zhang et al. 2023).

    Args:
        backbone: the source feature extractor.
        k: neighbours ``k`` of the vote.
        temperature: ``tau`` of the neighbours' similarity weights.
        threshold: ``beta``: a test sample enters the memory when its vote's largest probability reaches it (above 1: never).
        memory_size: most entries in the memory, the oldest leaving first (``None``: unbounded, as the authors').
    """

    def __init__(
        self,
        backbone,
        k: Annotated[int, Field(ge=1)] = 10,
        temperature: Annotated[float, Field(gt=0)] = 0.1,
        threshold: Annotated[float, Field(ge=0)] = 0.9,
        memory_size: Annotated[int, Field(ge=1)] | None = None,
    ):
        super().__init__(backbone, None, batch_statistics=False)
        self.threshold = threshold
        self.memory = NeighbourMemory(k, temperature, memory_size)

    def prepare_adaptation(self, exp: Experience) -> None:
        source = source_training_data(exp, "adanpc", NO_SOURCE_DATA)
        self.adaptation.prepare(self, classifier(self.backbone, self.head), on_start=lambda: self._fill(source))

    def _fill(self, source: DataView) -> None:
        """The memory holds the source features and labels (one shuffled pass)."""
        self.memory.clear()
        with torch.no_grad():
            for batch in self.batches(source, shuffle=True):
                self.memory.add(self.embed(batch.x), batch.y)

    def adapt(self, x: torch.Tensor) -> torch.Tensor:
        self.adaptation.begin_batch(self)
        with torch.no_grad():
            features = self.embed(x)
            probs = self.memory.vote(features, self.head.n_classes)
            confidence, label = probs.max(1)
            confident = confidence >= self.threshold
            self.memory.add(features[confident], label[confident])
            return probs.clamp_min(1e-20).log()
