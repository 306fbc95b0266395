"""The generative path of a strategy: LoRA on a decoder LLM, the answer-token loss, scored answers.

Continual instruction tuning (O-LoRA, Wang et al., EMNLP 2023 Findings,
https://arxiv.org/abs/2310.14152) trains a LoRA (Hu et al., ICLR 2022,
https://arxiv.org/abs/2106.09685) on the attention projections of a
:class:`~clpeft.backbones.generative_lm.GenerativeLM`, task after task, and scores the greedy
answers with each task's metric. Replay, EWC, LwF and joint training do the same on this path and
keep their own idea: :class:`InstructionTuning` holds what they share, built by
:meth:`InstructionTuning.of` only when the backbone is generative, so the classification path of
those strategies is untouched. Its options are one typed block, :class:`GenerativeOptions`, whose
fields a strategy's YAML gives as flat keys (``lora_rank: 8``). :class:`AnswerTraining` is all of it
but the LoRA: a strategy that puts its own adapters into the model (``lora_cl``, with its rank
schedules, adapter kinds and designed ``A``) trains and answers through it.

* :meth:`InstructionTuning.loss`: the mean next-token cross-entropy over the answers' tokens.
* :meth:`InstructionTuning.score`: each example's score in [0, 1] by its task's metric on a
  greedy answer (the engine's ``score`` hook).
* :meth:`InstructionTuning.run_alone`: the training examples' real tokens through the model one
  example at a time, for statistics of the adapted layers' inputs that padding must not enter.
* :meth:`InstructionTuning.mark_real_tokens`: tells the adapted layers which positions of each batch
  are real tokens, so that padding does not enter the input statistics they gather while training.
* :meth:`InstructionTuning.fisher`: EWC's diagonal empirical Fisher of the adapters, from
  per-example gradients of the answer's log-likelihood ``log p(y|x) = sum_t log p(y_t|x, y_<t)``.
* :meth:`InstructionTuning.final_metrics`: the perplexity of held-out general text before and after
  the stream (:mod:`~clpeft.components.generative.perplexity_retention`).
* :meth:`InstructionTuning.snapshot` and :meth:`InstructionTuning.distillation`: LwF's old model
  on this path, the adapters' values at the start of the task (the pretrained weights are shared,
  so no copy of the model), and the distillation of its token distributions at the answers'
  tokens.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Annotated

import torch
import torch.nn.functional as F
from pydantic import Field

from clpeft.backbones.generative_lm import GenerativeLM
from clpeft.components.generative.perplexity_retention import PerplexityRetention
from clpeft.components.lora import LoRALinear, inject_lora
from clpeft.components.regularization.distillation import distillation_loss
from clpeft.data import Batch
from clpeft.errors import UserError
from clpeft.instructions import Instruction
from clpeft.schema import Options
from clpeft.text_metrics import score


class GenerativeOptions(Options):
    """The LoRA a strategy trains on a ``generative_lm`` backbone (only there), and the general text it is checked on."""

    lora_targets: list[str] = Field(
        ["q_proj", "v_proj"], description="name suffixes of the linear layers LoRA adapts (O-LoRA: the attention's query and value)"
    )
    lora_rank: Annotated[int, Field(ge=1)] = Field(8, description="LoRA rank r")
    lora_alpha: Annotated[float, Field(gt=0)] = Field(16.0, description="LoRA alpha; the update is scaled by alpha / r")
    lora_dropout: Annotated[float, Field(ge=0, lt=1)] = Field(0.0, description="dropout on the LoRA input")
    general_text_samples: Annotated[int, Field(ge=0)] = Field(
        64,
        description="plot summaries of held-out general text whose perplexity is measured before and after the stream "
        "(perplexity_before/after/ratio; 0: not measured)",
    )


class AnswerTraining:
    """The answer-token loss, scored answers and general-ability retention on a :class:`GenerativeLM`,
    whatever adapters the strategy put into its ``net`` (see the module docstring).

    Not a module: the adapters live in the backbone, which the strategy already holds.

    Args:
        backbone: the generative backbone (another is refused in one line).
        general_text_samples: how many general texts measure retention (0: not measured); the
            ``before`` perplexity is measured here, so build this before the adapters change the model.
    """

    def __init__(self, backbone: GenerativeLM, general_text_samples: int):
        if not isinstance(backbone, GenerativeLM):
            raise UserError(
                f"this strategy trains and scores generated answers; use backbone.name: generative_lm (got {type(backbone).__name__})",
                key="backbone.name",
            )
        self.backbone = backbone
        self.retention = PerplexityRetention(backbone, general_text_samples) if general_text_samples else None

    def final_metrics(self) -> dict[str, float]:
        """The general text's perplexity before and after the stream (:mod:`~clpeft.components.generative.perplexity_retention`)."""
        return self.retention.metrics() if self.retention is not None else {}

    def trainable(self) -> dict[str, torch.nn.Parameter]:
        """The trained parameters of the backbone's ``net`` (the adapters), by name."""
        return {n: p for n, p in self.backbone.net.named_parameters() if p.requires_grad}

    def loss(self, examples: Sequence[Instruction]) -> torch.Tensor:
        """Mean next-token cross-entropy over the answers' tokens."""
        return self.backbone.loss(examples)

    @torch.no_grad()
    def run_alone(self, examples: Iterable[Instruction]) -> None:
        """Each example's prompt and answer tokens, as training feeds them, through the ``net`` on their
        own (no padding; no loss): forward hooks on the adapted layers see every real token of the
        examples and nothing else (the inputs InfLoRA's and EVA's statistics count)."""
        for example in examples:
            ids, mask, _ = self.backbone.training_batch([example])
            self.backbone.net(input_ids=ids, attention_mask=mask, use_cache=False)

    def mark_real_tokens(self, layers: Mapping[str, LoRALinear]) -> torch.utils.hooks.RemovableHandle:
        """From now on every forward of the ``net`` sets ``layers``' :attr:`~clpeft.components.lora.LoRALinear.token_mask`
        to the call's ``attention_mask`` (``None`` without one): PRILoRA's input statistics then count the real
        tokens of a right-padded training batch and not its padding. The mask stays until the next forward, so the
        forward that gradient checkpointing recomputes in the backward pass sees its own batch's. Returns the
        hook's handle (``remove()`` stops it)."""
        layers = list(layers.values())

        def mark(_net, _args, kwargs):
            for layer in layers:
                layer.token_mask = kwargs.get("attention_mask")

        return self.backbone.net.register_forward_pre_hook(mark, with_kwargs=True)

    @torch.no_grad()
    def score(self, batch: Batch) -> torch.Tensor:
        """Each example's score in [0, 1] by its task's metric, on a greedy answer."""
        return score_answers(self.backbone, list(batch.x))

    def fisher(self, batches: Iterable[Batch], params: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Diagonal empirical Fisher ``E[(d log p(y|x) / d theta)^2]`` of ``params`` (by the caller's
        names; zero for a parameter the answers do not depend on), one backward per example
        (``log p(y|x)`` sums the answer tokens' log-probabilities)."""
        fisher = {n: torch.zeros_like(p) for n, p in params.items()}
        count = 0
        for batch in batches:
            for example in batch.x:
                logits, targets, _ = self.backbone.answer_logits([example])
                nll = F.cross_entropy(logits.float(), targets, reduction="sum")
                for f, g in zip(fisher.values(), torch.autograd.grad(nll, list(params.values()), allow_unused=True)):
                    if g is not None:
                        f += g.detach().pow(2)
                count += 1
        return {n: f / max(count, 1) for n, f in fisher.items()}

    def snapshot(self) -> dict[str, torch.Tensor]:
        """A detached copy of the adapters' current values: the old model of :meth:`distillation`."""
        return {n: p.detach().clone() for n, p in self.trainable().items()}

    def distillation(
        self, examples: Sequence[Instruction], old: dict[str, torch.Tensor], temperature: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(loss, distillation)``: the answer-token loss and LwF's ``L_old`` against the model with
        the adapters ``old``, a temperature-``T`` KL between the two models' next-token
        distributions at the answers' tokens, averaged over the tokens."""
        logits, targets, _ = self.backbone.answer_logits(examples)
        with torch.no_grad():
            teacher, _, _ = self.backbone.answer_logits(examples, params=old)
        return F.cross_entropy(logits.float(), targets), distillation_loss(logits, teacher, temperature)


class InstructionTuning(AnswerTraining):
    """:class:`AnswerTraining` with one LoRA on the backbone's ``net`` (see the module docstring).

    Args:
        backbone: the generative backbone (another is refused in one line); LoRA is injected into its ``net``.
        options: the LoRA's targets, rank, alpha and dropout, and how much general text measures retention.
    """

    def __init__(self, backbone: GenerativeLM, options: GenerativeOptions):
        super().__init__(backbone, options.general_text_samples)
        self.lora = inject_lora(
            backbone.net,
            options.lora_targets,
            options.lora_rank,
            options.lora_alpha,
            dropout=options.lora_dropout,
            key="strategy.lora_targets",
        )

    @classmethod
    def of(cls, backbone, options: GenerativeOptions) -> InstructionTuning | None:
        """The generative path on a :class:`GenerativeLM`, else ``None`` (LoRA options other than the defaults are refused there)."""
        if isinstance(backbone, GenerativeLM):
            return cls(backbone, options)
        changed = options.changed()
        if changed:
            raise UserError(
                f"applies to a generative_lm backbone only (this one is {type(backbone).__name__}); drop it", key=f"strategy.{changed[0]}"
            )
        return None


@torch.no_grad()
def score_answers(backbone: GenerativeLM, examples: Sequence[Instruction]) -> torch.Tensor:
    """Each example's score in [0, 1] by its task's metric, on ``backbone``'s greedy answer (one batched decoding,
    each example's ``max_new_tokens`` and stop strings)."""
    answers = backbone.generate(list(examples), max(e.max_new_tokens for e in examples), sorted({s for e in examples for s in e.stop}))
    return torch.tensor([score(e.metric, a, e.target, e.choices) for e, a in zip(examples, answers)])
