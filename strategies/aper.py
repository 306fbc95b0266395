"""APER (ADAM): adapt a PEFT module once, then prototypes on pre-trained + adapted features.

Zhou, Cai, Ye, Zhan & Liu, "Revisiting Class-Incremental Learning with Pre-Trained Models:
Generalizability and Adaptivity are All You Need", IJCV 2024 (https://arxiv.org/abs/2303.07338;
code: LAMDA-PILOT ``models/aper_adapter.py``, ``aper_vpt.py``).

1. **Adapt** (first experience only): a parameter-efficient module is added to the frozen
   pre-trained model ``phi`` and trained with a cosine classifier and cross-entropy, giving the
   adapted model ``phi*``. Modules (``peft``): an AdaptFormer ``adapter`` parallel to each
   block's MLP (bottleneck 64, scale 0.1: the paper's main variant), ``vpt`` prompt tokens
   (deep: new tokens before every block; shallow: before the first), or ``lora`` on the
   ``lora_targets`` linears. Then ``phi*`` is frozen for good.
2. **Merge**: every sample is embedded as ``[phi(x), phi*(x)]`` (concatenation) and
   class ``i``'s prototype is its mean embedding ``p_i`` (eq. 3, over all of its training
   samples); predictions are ``cos([phi(x), phi*(x)], p_i)`` (a
   :class:`~clpeft.components.heads.classifiers.PrototypeHead`), updated after every experience.

After the first experience nothing trains (the engine makes no optimizer step). ``phi`` is
the engine's backbone, untouched and frozen, so its features come from the feature cache
(served with the raw inputs, as prompt methods get their query); only ``phi*`` runs: one
backbone pass per sample where PILOT's two-branch network pays two. The adapter and LoRA
variants inject into a copy of the backbone that shares its weights
(:func:`~clpeft.components.lora.parallel_adapter.shared_weights_copy`), so no weight is stored twice.

Checked against PILOT's ``models/aper_adapter.py`` and ``backbone/vpt.py`` in
``tests/reference/test_pilot.py``: the adapter steps, prototypes and logits, and the VPT
features (PILOT's prompts start at zero, as here; VPT's paper draws them uniformly). The one
difference: the adaptation's cosine learning-rate schedule (``train.schedule: cosine``) is
stepped per optimizer step here, per epoch in PILOT.

Paper symbols -> parameters: adapter bottleneck ``r`` -> ``adapter_bottleneck``, its scale
``s`` -> ``adapter_scale``; prompt length ``p`` -> ``prompt_length``.
"""

from __future__ import annotations

from typing import Annotated, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from clpeft.components.heads.class_statistics import ClassStatistics
from clpeft.components.heads.classifiers import CosineHead, PrototypeHead
from clpeft.components.lora import inject_lora
from clpeft.components.lora.parallel_adapter import inject_adapters, shared_weights_copy
from clpeft.components.prompts.prompted import promptable_width, query_of
from clpeft.data import Batch
from clpeft.experience import Experience
from clpeft.registry import register_strategy
from clpeft.strategy import Strategy


@register_strategy("aper")
class APER(Strategy):
    """APER/ADAM: PEFT-adapt on the first experience, cosine prototypes on [pre-trained, adapted] features (Zhou et al. 2023).

    Args:
        backbone: the pre-trained model (frozen by the strategy); a timm ViT for ``adapter`` and ``vpt``.
        peft: the module adapted on the first experience: ``adapter``, ``vpt`` or ``lora``.
        adapter_bottleneck: ``r``, the adapter's hidden width (``ffn_num``).
        adapter_scale: ``s``, the factor on the adapter's output.
        adapter_dropout: dropout on the adapter's bottleneck.
        vpt_type: ``deep`` (prompts before every block) or ``shallow`` (before the first).
        prompt_length: prompt tokens per layer (``prompt_token_num``).
        lora_targets: module-name suffixes of the linears LoRA adapts.
        lora_rank: LoRA rank.
        lora_alpha: LoRA ``alpha`` (scaling ``alpha / rank``).
    """

    needs_query = True  # the pre-trained features phi(x), from the feature cache
    cache_features = False  # raw inputs for the adapted model phi*

    def __init__(
        self,
        backbone,
        peft: Literal["adapter", "vpt", "lora"] = "adapter",
        adapter_bottleneck: Annotated[int, Field(ge=1)] = 64,
        adapter_scale: Annotated[float, Field(gt=0)] = 0.1,
        adapter_dropout: Annotated[float, Field(ge=0, lt=1)] = 0.1,
        vpt_type: Literal["deep", "shallow"] = "deep",
        prompt_length: Annotated[int, Field(ge=1)] = 5,
        lora_targets: list[str] = ["qkv"],
        lora_rank: Annotated[int, Field(ge=1)] = 8,
        lora_alpha: Annotated[float, Field(gt=0)] = 8.0,
    ):
        super().__init__(backbone)
        backbone.freeze()
        dim = backbone.feature_dim
        self.peft = peft
        if peft == "vpt":
            width = promptable_width(backbone, "aper (peft: vpt)")
            layers = len(backbone.net.blocks) if vpt_type == "deep" else 1
            self.prompt_tokens = nn.Parameter(torch.zeros(layers, prompt_length, width))
        else:
            self.adapted = shared_weights_copy(backbone)
            if peft == "adapter":
                promptable_width(backbone, "aper (peft: adapter)")
                inject_adapters(self.adapted.net, adapter_bottleneck, adapter_scale, adapter_dropout)
            else:
                inject_lora(self.adapted, lora_targets, lora_rank, lora_alpha, key="strategy.lora_targets")
        self.adapt_head = CosineHead(dim)
        self.head = PrototypeHead(2 * dim, metric="cosine")
        self.stats = ClassStatistics(2 * dim, covariance="none")
        self.register_buffer("adapted_done", torch.zeros((), dtype=torch.bool))
        self.adapting = False
        self._set_trainable(False)

    def peft_parameters(self) -> list[nn.Parameter]:
        """The parameters of the PEFT module (those of ``phi*`` that ``phi`` does not have)."""
        if self.peft == "vpt":
            return [self.prompt_tokens]
        shared = {id(p) for p in self.backbone.parameters()}
        return [p for p in self.adapted.parameters() if id(p) not in shared]

    def _set_trainable(self, trainable: bool) -> None:
        for p in self.peft_parameters():
            p.requires_grad_(trainable)
        self.adapt_head.requires_grad_(trainable)

    def adapted_features(self, x: torch.Tensor) -> torch.Tensor:
        """``phi*(x)`` of raw inputs."""
        if self.peft == "vpt":
            return self.backbone.forward_prompted(x, prompts=dict(enumerate(self.prompt_tokens)))
        return self.adapted(x)

    def features(self, x: torch.Tensor, query: torch.Tensor | None = None) -> torch.Tensor:
        """``[phi(x), phi*(x)]``; ``query`` is the cached ``phi(x)`` when the engine has it."""
        pretrained = query_of(self.backbone, x, query)
        return torch.cat([pretrained.float(), self.adapted_features(x).float()], dim=1)

    # ------------------------------------------------------------------ hooks

    def before_experience(self, exp: Experience) -> None:
        self.head.grow_to(exp.n_classes_seen)
        self.adapting = not bool(self.adapted_done)
        self._set_trainable(self.adapting)
        if self.adapting:
            self.adapt_head.grow_to(exp.n_classes_seen)

    def training_step(self, batch: Batch) -> torch.Tensor:
        """Only while adapting: cross-entropy of the cosine classifier on ``phi*(x)``."""
        return F.cross_entropy(self.adapt_head(self.adapted_features(batch.x)), batch.y)

    @torch.no_grad()
    def after_experience(self, exp: Experience) -> None:
        if self.adapting:
            self.adapting = False
            self._set_trainable(False)
            self.adapted_done.fill_(True)
        share = ClassStatistics(self.stats.dim, covariance="none").to(self.stats.mean.device)
        for batch in self.batches(exp.train, shard=True):
            share.update(self.features(batch.x, batch.features), batch.y)
        self.stats.merge(share.gathered())
        self.stats.grow_to(exp.n_classes_seen)
        self.head.fit(self.stats)

    def predict(self, x: torch.Tensor, query: torch.Tensor | None = None) -> torch.Tensor:
        """Cosine similarities of ``[phi(x), phi*(x)]`` to the class prototypes."""
        return self.head(self.features(x, query))
