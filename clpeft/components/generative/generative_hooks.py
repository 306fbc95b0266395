"""The engine hooks of a strategy that also runs on a generative LLM, as a mixin.

``replay``, ``ewc``, ``lwf`` and ``joint`` classify on an image or text backbone and, on a
``generative_lm`` one, train and answer through :class:`~clpeft.components.generative.InstructionTuning`
(``self.generative``, ``None`` on other backbones). :class:`GenerativeHooks` routes the loss, the
engine's scoring hook and :meth:`final_metrics` to it when it is there, and to the classifier's
path when it is not.
"""

from __future__ import annotations

import torch

from clpeft.components.generative.instruction_tuning import InstructionTuning
from clpeft.data import Batch


class GenerativeHooks:
    """Mixin (listed before the strategy base class): generative loss, scoring and perplexity when ``self.generative`` is set."""

    generative: InstructionTuning | None

    def training_step(self, batch: Batch) -> torch.Tensor:
        return self.generative.loss(batch.x) if self.generative else super().training_step(batch)

    @property
    def score(self):
        """The engine's scoring hook on a generative backbone (greedy answers scored by each task's metric), else ``None``."""
        return self.generative.score if self.generative else None

    def final_metrics(self) -> dict[str, float]:
        """On a generative backbone, the general text's perplexity before and after the stream."""
        return self.generative.final_metrics() if self.generative else {}
