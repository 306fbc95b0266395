"""Sequential LoRA fine-tuning of a generative LLM: the lower bound of continual instruction tuning.

One LoRA (Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", ICLR 2022,
https://arxiv.org/abs/2106.09685) on the chosen projections is trained on each task in turn
with the answer-token loss and nothing against forgetting: the "SeqFT" / "SeqLoRA" row of
O-LoRA's tables (Wang et al., EMNLP 2023 Findings, https://arxiv.org/abs/2310.14152), where it
forgets most. Answers are generated greedily in batches with the KV cache and scored by each
task's metric (:meth:`SeqFinetune.score`), which fills the accuracy matrix.

Paper symbols: ``r`` -> ``rank``, ``alpha`` -> ``alpha`` (scaling ``alpha / r``), the adapted
projections -> ``targets`` (O-LoRA: the attention's query and value projections).
"""

from __future__ import annotations

from typing import Annotated

import torch
from pydantic import Field

from clpeft.backbones.generative_lm import GenerativeLM
from clpeft.components.lora import inject_lora
from clpeft.data import Batch
from clpeft.errors import UserError
from clpeft.experience import Experience
from clpeft.registry import register_strategy
from clpeft.strategy import Strategy
from clpeft.text_metrics import score


@register_strategy("seq_finetune")
class SeqFinetune(Strategy):
    """One LoRA trained on every task in turn on a ``generative_lm`` backbone (lower bound).

    Args:
        backbone: a :class:`~clpeft.backbones.generative_lm.GenerativeLM`.
        targets: name suffixes of the linear layers to adapt (``q_proj``, ``v_proj`` in Llama models).
        rank: LoRA rank ``r``.
        alpha: LoRA ``alpha``; the update is scaled by ``alpha / r``.
        dropout: dropout on the LoRA input.
    """

    supported_scenarios = ("instruction_incremental",)
    cache_features = False

    def __init__(
        self,
        backbone,
        targets: list[str] | None = None,
        rank: Annotated[int, Field(ge=1)] = 8,
        alpha: Annotated[float, Field(gt=0)] = 16.0,
        dropout: Annotated[float, Field(ge=0, lt=1)] = 0.0,
    ):
        if not isinstance(backbone, GenerativeLM):
            raise UserError(
                f"seq_finetune generates answers; use backbone.name: generative_lm (got {type(backbone).__name__})", key="backbone.name"
            )
        super().__init__(backbone)
        self.lora = inject_lora(backbone.net, targets or ["q_proj", "v_proj"], rank, alpha, dropout=dropout, key="strategy.targets")

    def before_experience(self, exp: Experience) -> None:
        """Nothing to grow: the language model's vocabulary is the output."""

    def training_step(self, batch: Batch) -> torch.Tensor:
        return self.backbone.loss(batch.x)

    @torch.no_grad()
    def score(self, batch: Batch) -> torch.Tensor:
        """Each example's score in [0, 1] by its task's metric, on a greedy answer (the engine's scoring hook)."""
        examples = batch.x
        answers = self.backbone.generate(
            [e.prompt for e in examples], max(e.max_new_tokens for e in examples), sorted({s for e in examples for s in e.stop})
        )
        return torch.tensor([score(e.metric, a, e.target, e.choices) for e, a in zip(examples, answers)])
