"""A closed-form head on frozen features, with optional first-session adaptation.

The recipe SimpleCIL, RanPAC, FSA and the FSCIL prototype methods share (Zhou et al., "Revisiting
Class-Incremental Learning with Pre-Trained Models: Generalizability and Adaptivity are All You
Need", IJCV 2024, https://arxiv.org/abs/2303.07338: APER's first-session adaptation and
prototype classifier): optionally adapt the backbone on the first experience, then freeze it,
accumulate per-class feature statistics and set a closed-form head from them after every
experience. A strategy subclasses :class:`FrozenFeatureClassifier` with its head, its statistics
and :meth:`~FrozenFeatureClassifier.fit_head`.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from clpeft.components.heads.class_statistics import ClassStatistics
from clpeft.components.lora.parallel_adapter import inject_adapters
from clpeft.components.prompts.prompted import promptable_width
from clpeft.data import Batch
from clpeft.errors import UserError
from clpeft.experience import Experience
from clpeft.strategy import Strategy

AdaptPart = Literal["none", "full", "last_blocks", "adapter"]


class FrozenFeatureClassifier(Strategy):
    """Closed-form head on frozen features, with optional first-session adaptation (base class).

    * ``adapt != 'none'``: during the first experience the chosen part of the backbone and
      ``adapt_head`` train with cross-entropy in the engine's loop (``'full'``: the whole
      backbone; ``'last_blocks'``: the last ``adapt_blocks`` of ``backbone.net.blocks`` for
      timm ViTs/EfficientNets, else the last ``adapt_blocks`` modules holding parameters,
      plus every parameter after them such as the final norm; ``'adapter'``: AdaptFormer
      adapters injected into every block of a timm ViT, bottleneck ``adapter_bottleneck``,
      scale 0.1, dropout 0.1, zero output at the start, as in RanPAC's and LAMDA-PILOT's
      ``vit_adapter.py``; they stay in the backbone, so later features are the adapted ones).
      After it everything is frozen.
    * every experience then ends with one pass over its training data:
      :meth:`transform` of the frozen features goes into :attr:`stats`, and :meth:`fit_head`
      sets :attr:`head` in closed form. With nothing trainable the engine makes no step.

    The backbone is frozen here whatever ``backbone.freeze`` says. With ``adapt='none'`` the
    engine therefore caches its features; with adaptation the adapted part stays trainable
    until the first experience ends, so no cache of pre-adaptation features is ever built.

    Args:
        backbone: the feature extractor.
        head: the closed-form head (:attr:`head`).
        stats: the per-class statistics accumulator.
        adapt: which part of the backbone the first experience fine-tunes.
        adapt_blocks: how many final blocks ``'last_blocks'`` fine-tunes.
        adapt_head: the head trained with the backbone during adaptation.
        dropout: dropout on the features before ``adapt_head``.
        adapter_bottleneck: the adapters' hidden width for ``'adapter'`` (PILOT's ``ffn_num``).
    """

    def __init__(
        self,
        backbone,
        head: nn.Module,
        stats: ClassStatistics,
        adapt: AdaptPart = "none",
        adapt_blocks: int = 1,
        adapt_head: nn.Module | None = None,
        dropout: float = 0.0,
        adapter_bottleneck: int = 64,
    ):
        super().__init__(backbone)
        self.head = head
        self.stats = stats
        self.adapt = adapt
        self.adapt_blocks = adapt_blocks
        self.adapt_head = adapt_head
        self.adapt_dropout = nn.Dropout(dropout)
        self.adapting = False
        self.adapters: dict[str, nn.Module] = {}
        if adapt == "adapter":
            promptable_width(backbone, f"{self.registered_name} (adapt: adapter)")
            self.adapters = inject_adapters(backbone.net, adapter_bottleneck, scale=0.1, dropout=0.1)
        self.backbone.freeze()
        self._set_adapted_trainable(adapt != "none")

    # ------------------------------------------------------------------ adaptation

    def _adapted_parameters(self) -> list[nn.Parameter]:
        if self.adapt == "adapter":
            return [p for adapter in self.adapters.values() for p in adapter.parameters()]
        params = list(self.backbone.parameters())
        if self.adapt == "full":
            return params
        blocks = getattr(getattr(self.backbone, "net", None), "blocks", None)
        units = (
            list(blocks)
            if blocks is not None
            else [m for m in self.backbone.modules() if next(m.parameters(recurse=False), None) is not None]
        )
        if not 1 <= self.adapt_blocks <= len(units):
            raise UserError(f"adapt_blocks must be between 1 and {len(units)} for this backbone", key="strategy.adapt_blocks")
        first = next(units[-self.adapt_blocks].parameters())
        start = next(i for i, p in enumerate(params) if p is first)
        return params[start:]

    def _set_adapted_trainable(self, trainable: bool) -> None:
        if self.adapt == "none":
            return
        for p in self._adapted_parameters():
            p.requires_grad_(trainable)
        if self.adapt_head is not None:
            self.adapt_head.requires_grad_(trainable)
        if not trainable:
            self.backbone.eval()

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        """Load, then freeze the adapted part if the stored state is past the first experience."""
        result = super().load_state_dict(state_dict, strict, assign)
        if bool(self.stats.seen().any()):
            self._set_adapted_trainable(False)
            self.refresh_input_mode()
        return result

    # ------------------------------------------------------------------ hooks

    def before_experience(self, exp: Experience) -> None:
        self.head.grow_to(exp.n_classes_seen)
        self.adapting = self.adapt != "none" and exp.index == 0
        self._set_adapted_trainable(self.adapting)
        if self.adapting and self.adapt_head is not None:
            self.adapt_head.grow_to(exp.n_classes_seen)

    def training_step(self, batch: Batch) -> torch.Tensor:
        """Only runs while adapting: cross-entropy of the adaptation head."""
        return F.cross_entropy(self.adapt_head(self.adapt_dropout(self.embed(batch.x))), batch.y)

    def after_experience(self, exp: Experience) -> None:
        if self.adapting:
            self.adapting = False
            self._set_adapted_trainable(False)
            self.refresh_input_mode()
        self.absorb(exp)
        self.fit_head()

    @torch.no_grad()
    def absorb(self, exp: Experience) -> None:
        """One pass over the experience's training data into :attr:`stats` (each rank of a
        data-parallel run reads its share; the shares are gathered)."""
        share = ClassStatistics(self.stats.dim, covariance=self.stats.mode).to(self.stats.mean.device)
        for batch in self.batches(exp.train, shard=True):
            share.update(self.transform(self.embed(batch.x)), batch.y)
        self.stats.merge(share.gathered())
        self.stats.grow_to(exp.n_classes_seen)

    def transform(self, features: torch.Tensor) -> torch.Tensor:
        """The representation the head sees (identity; RanPAC projects)."""
        return features

    def fit_head(self) -> None:
        """Set :attr:`head` from :attr:`stats`."""
        raise NotImplementedError

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        features = self.embed(x)
        if self.adapting:
            return self.adapt_head(features)
        return self.head(self.transform(features))
