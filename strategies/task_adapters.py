"""Per-task LoRA adapters on a generative LLM, served together: the upper bound of isolation methods.

Parameter isolation at its limit: every task trains its own LoRA (Hu et al., ICLR 2022,
https://arxiv.org/abs/2106.09685) on the answer tokens, from a fresh start (``B_t = 0``), while the
pretrained model and the other tasks' LoRAs stay as they are, so nothing learnt is ever
overwritten. It is the "PerTaskFT" row of O-LoRA's tables (Wang et al., "Orthogonal Subspace
Learning for Language Model Continual Learning", EMNLP 2023 Findings,
https://arxiv.org/abs/2310.14152: a separate model per task, given the task at inference) with one
LoRA per task instead of a fine-tuned model, and the task-id setting of Progressive Prompts
(Razdaibiedina et al., ICLR 2023, https://arxiv.org/abs/2301.12314). Registered as ``task_lora``:
one LoRA per task, as ``o_lora`` names its LoRA method.

At evaluation each test prompt is answered by one adapter, chosen by ``routing``:

* ``task_id``: its own task's (an oracle: the upper bound; a prompt of a task not trained yet
  gets none, i.e. the pretrained model);
* ``router``: the task whose centroid of frozen-model prompt embeddings is nearest, an
  ExpertGate-style gate (Aljundi et al., CVPR 2017, https://arxiv.org/abs/1611.06194) that needs
  no task id, no training and no stored data
  (:class:`~clpeft.components.generative.task_router.TaskRouter`; the centroids are taken after each
  task from its training prompts, in both modes).

What clpeft adds: a mixed batch is answered in **one** batched greedy decoding (prefill and every
KV-cache step) with each sample's own adapter, through the batched multi-adapter LoRA
(:mod:`clpeft.components.generative.task_adapters`), instead of a model or a pass per task; and the
router's accuracy on each task's test prompts is measured: ``final_metrics`` adds
``router_accuracy`` (all test prompts) and ``router_task_accuracy`` (per task) to ``metrics.json``,
with the general text's perplexity before and after the stream (``routing: task_id``: the
general text has no task, so it gets no adapter; ``router``: each text gets its routed adapter).

The pool holds ``max_tasks`` adapters plus an empty one (no task, the pretrained model), sized when
the strategy is built; a longer stream is refused in one line before training. Finished adapters
get zero gradients and no weight decay, so they stay bit for bit as they were.

Paper symbols: ``r`` -> ``lora_rank``, ``alpha`` -> ``lora_alpha``, the adapted projections ->
``lora_targets``.
"""

from __future__ import annotations

import math
from typing import Annotated, Literal

import torch
from pydantic import Field

from clpeft.backbones.generative_lm import GenerativeLM
from clpeft.components.generative import GenerativeOptions
from clpeft.components.generative.instruction_tuning import score_answers
from clpeft.components.generative.perplexity_retention import PerplexityRetention
from clpeft.components.generative.task_adapters import TaskAdapters
from clpeft.components.generative.task_router import TaskRouter, prompt_embeddings
from clpeft.data import Batch
from clpeft.errors import UserError
from clpeft.experience import Experience
from clpeft.instructions import Instruction
from clpeft.registry import register_strategy
from clpeft.schema import flat_options
from clpeft.strategy import Strategy


@register_strategy("task_lora")
class TaskLoRAServing(Strategy):
    """One LoRA per task, each test prompt answered by its task's (by id or router), all in one batched pass.

    Args:
        backbone: a :class:`~clpeft.backbones.generative_lm.GenerativeLM`.
        routing: which adapter answers a test prompt: its task's (``task_id``, the upper bound) or
            the nearest task centroid's (``router``).
        max_tasks: the pool's size: the most experiences the stream may have.
        generative: flat keys ``lora_targets``, ``lora_rank``, ``lora_alpha``, ``lora_dropout`` of
            every task's LoRA and ``general_text_samples``
            (:class:`~clpeft.components.generative.GenerativeOptions`).
    """

    supported_scenarios = ("instruction_incremental",)
    cache_features = False

    @flat_options
    def __init__(
        self,
        backbone,
        routing: Literal["task_id", "router"] = "task_id",
        max_tasks: Annotated[int, Field(ge=1)] = 16,
        generative: GenerativeOptions = GenerativeOptions(),
    ):
        if not isinstance(backbone, GenerativeLM):
            raise UserError(
                f"task_lora trains and scores generated answers; use backbone.name: generative_lm (got {type(backbone).__name__})",
                key="backbone.name",
            )
        super().__init__(backbone)
        self.routing = routing
        self.max_tasks = max_tasks  # adapter max_tasks: no task (its B stays 0)
        n = generative.general_text_samples
        self.retention = PerplexityRetention(backbone, n) if n else None
        self.adapters = TaskAdapters(
            backbone.net,
            generative.lora_targets,
            max_tasks + 1,
            generative.lora_rank,
            generative.lora_alpha,
            generative.lora_dropout,
            key="strategy.lora_targets",
        )
        self.router = TaskRouter(backbone.feature_dim, max_tasks)
        self.task_of: dict[Instruction, int] = {}

    def before_experience(self, exp: Experience) -> None:
        """Refuse a stream longer than the pool, learn which task each test prompt is from, train this task's adapter."""
        length = max(exp.index + 1, exp.stream_length or 0)
        if length > self.max_tasks:
            raise UserError(
                f"the stream has {length} tasks but the pool holds {self.max_tasks}; set it to {length}", key="strategy.max_tasks"
            )
        self.experience = exp
        self.task_of = {example: e.index for e in (*exp.past, exp) for example in e.test.load()[0]}  # a repeated example: the later task
        self.adapters.train_task(exp.index)

    def param_groups(self, lr: float) -> list[dict]:
        """The stacked adapters, without weight decay (the finished tasks' slices get zero gradients and must not move)."""
        return [{"params": self.adapters.parameters(), "lr": lr, "weight_decay": 0.0}]

    def training_step(self, batch: Batch) -> torch.Tensor:
        return self.backbone.loss(batch.x)

    def after_experience(self, exp: Experience) -> None:
        """Freeze the model again and take the task's centroid of its training prompts."""
        self.adapters.train_task(None)
        for batch in self.batches(exp.train):
            self.router.add(exp.index, prompt_embeddings(self.backbone, batch.x))

    def adapter_of(self, examples: list[Instruction | str]) -> torch.Tensor:
        """``(N,)`` the adapter answering each example (the empty adapter ``max_tasks`` where there is no task)."""
        if self.routing == "task_id":
            return torch.tensor([self.task_of.get(e, self.max_tasks) if isinstance(e, Instruction) else self.max_tasks for e in examples])
        if not len(self.router.tasks):
            return torch.full((len(examples),), self.max_tasks, dtype=torch.long)
        return self.router.predict(prompt_embeddings(self.backbone, examples))

    @torch.no_grad()
    def score(self, batch: Batch) -> torch.Tensor:
        """Each example's score in [0, 1] by its task's metric, on a greedy answer of its adapter (one batched decoding)."""
        examples = list(batch.x)
        with self.adapters.routed(self.adapter_of(examples)):
            return score_answers(self.backbone, examples)

    def final_metrics(self) -> dict:
        """``router_accuracy`` and ``router_task_accuracy`` on the seen tasks' test prompts; the general text's perplexity."""
        metrics = self._perplexity() if self.retention is not None else {}
        if self.experience is None:
            return metrics
        hits, counts = [], []
        for exp in (*self.experience.past, self.experience):
            routed = [self.router.predict(prompt_embeddings(self.backbone, b.x)) for b in self.batches(exp.test)]
            hits.append(int((torch.cat(routed) == exp.index).sum()))
            counts.append(len(exp.test))
        return {**metrics, "router_accuracy": sum(hits) / sum(counts), "router_task_accuracy": [h / c for h, c in zip(hits, counts)]}

    @torch.no_grad()
    def _perplexity(self) -> dict[str, float]:
        """The general text's perplexity after the stream, each text under the adapter it is routed to."""
        texts = self.retention.texts
        adapters = self.adapter_of(list(texts))
        log_total, tokens = 0.0, 0
        for k in adapters.unique().tolist():
            group = [t for t, a in zip(texts, adapters.tolist()) if a == k]
            self.adapters.train_task(k)
            n = sum(min(len(self.backbone.tokenizer(t)["input_ids"]), self.backbone.max_length) - 1 for t in group)
            log_total += n * math.log(self.backbone.perplexity(group))
            tokens += n
        self.adapters.train_task(None)
        after = math.exp(log_total / max(tokens, 1))
        return {"perplexity_before": self.retention.before, "perplexity_after": after, "perplexity_ratio": after / self.retention.before}
