"""Sequential LoRA fine-tuning of a generative LLM: the lower bound of continual instruction tuning.

One LoRA (Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", ICLR 2022,
https://arxiv.org/abs/2106.09685) on the chosen projections is trained on each task in turn
with the answer-token loss and nothing against forgetting: the "SeqFT" / "SeqLoRA" row of
O-LoRA's tables (Wang et al., EMNLP 2023 Findings, https://arxiv.org/abs/2310.14152), where it
forgets most. Answers are generated greedily in batches with the KV cache and scored by each
task's metric (:meth:`SeqFinetune.score`), which fills the accuracy matrix. The LoRA, loss and
scoring are :class:`~clpeft.components.generative.InstructionTuning`, shared with the generative
path of ``replay``, ``ewc``, ``lwf`` and ``joint``.

Paper symbols: ``r`` -> ``lora_rank``, ``alpha`` -> ``lora_alpha`` (scaling ``alpha / r``), the
adapted projections -> ``lora_targets`` (O-LoRA: the attention's query and value projections).
"""

from __future__ import annotations

import torch

from clpeft.components.generative import GenerativeOptions, InstructionTuning
from clpeft.data import Batch
from clpeft.experience import Experience
from clpeft.registry import register_strategy
from clpeft.schema import flat_options
from clpeft.strategy import Strategy


@register_strategy("seq_finetune")
class SeqFinetune(Strategy):
    """One LoRA trained on every task in turn on a ``generative_lm`` backbone (lower bound).

    Args:
        backbone: a :class:`~clpeft.backbones.generative_lm.GenerativeLM`.
        generative: flat keys ``lora_targets``, ``lora_rank``, ``lora_alpha``, ``lora_dropout``
            (:class:`~clpeft.components.generative.GenerativeOptions`).
    """

    supported_scenarios = ("instruction_incremental",)
    cache_features = False

    @flat_options
    def __init__(self, backbone, generative: GenerativeOptions = GenerativeOptions()):
        super().__init__(backbone)
        self.generative = InstructionTuning(backbone, generative)

    def before_experience(self, exp: Experience) -> None:
        """Nothing to grow: the language model's vocabulary is the output."""

    def training_step(self, batch: Batch) -> torch.Tensor:
        return self.generative.loss(batch.x)

    def score(self, batch: Batch) -> torch.Tensor:
        """Each example's score in [0, 1] by its task's metric, on a greedy answer (the engine's scoring hook)."""
        return self.generative.score(batch)

    def final_metrics(self) -> dict[str, float]:
        """The general text's perplexity before and after the stream (``perplexity_before/after/ratio``)."""
        return self.generative.final_metrics()
