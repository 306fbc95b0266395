"""The strategy contract: every continual-learning method is a :class:`Strategy`.

The engine owns the loop (experiences, epochs, optimizer steps, evaluation, checkpoints) and
calls a fixed set of hooks. Each hook has a default, so a method overrides only what differs:

========================  =================================================================
hook (in the order called) default
========================  =================================================================
``before_experience``     grow the head to the classes seen so far
``train_data``            the experience's training data
``param_groups``          every parameter with ``requires_grad``, at the run's learning rate
``before_epoch``          nothing (each epoch: ``(exp, epoch)``)
``training_step``         cross-entropy of ``predict`` on the batch; returns the loss
``after_backward``        nothing (gradients in place, before clipping and the optimizer step)
``after_training_step``   nothing; True when parameters were replaced (see below)
``after_epoch``           nothing (each epoch: ``(exp, epoch)``)
``after_experience``      nothing (prototypes, statistics, memory updates)
``before_evaluation``     nothing (``exp``: the experience just trained)
``predict``               ``head(embed(x))``: logits over every class seen so far
``after_evaluation``      nothing (``exp`` and the row of accuracies just measured)
``adapt``                 ``predict`` (test-time adaptation, instead of the training hooks)
``state_dict``            ``nn.Module`` state: parameters, buffers and components' extra state
========================  =================================================================

When the backbone is frozen the engine hands the strategy cached backbone *features* instead
of raw inputs (``uses_features``), so call :meth:`embed`, not ``self.backbone``, to turn a
batch into features. During training ``self.epoch`` is the current epoch (0-based) and
``self.planned_steps`` the optimizer steps the engine plans for the experience; under
``torchrun`` a batch holds only this rank's share of the global batch, so count epochs or steps,
never samples.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator
from typing import TYPE_CHECKING, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from clpeft import fsdp
from clpeft.backbones.base import Backbone
from clpeft.components.heads.classifiers import LinearHead
from clpeft.data import Batch, DataView
from clpeft.experience import Experience

if TYPE_CHECKING:
    from clpeft.data_access import DataAccess

# The before_/after_ hooks: events around the engine's loop. The work methods (training_step,
# predict, adapt, ...) are not in it; a before_/after_ method outside it is refused.
EVENT_HOOKS = frozenset(
    {
        "before_experience",
        "before_epoch",
        "after_backward",
        "after_training_step",
        "after_epoch",
        "after_experience",
        "before_evaluation",
        "after_evaluation",
    }
)


class Strategy(nn.Module):
    """Base class of continual-learning methods (subclass it and override hooks).

    Args:
        backbone: the feature extractor (``backbone.feature_dim`` sizes the head).

    Class attributes:
        supported_scenarios: scenario kinds the method handles; ``None`` means all.
        cache_features: may the engine hand the strategy cached backbone features instead of
            raw inputs? ``True``/``False`` forces it; ``None`` (default) caches exactly when the
            backbone is frozen. A frozen backbone whose output the method changes (LoRA updates,
            an EMA expert) sets ``False``.
        needs_query: batches carry raw inputs *and* the frozen backbone's cached features of
            them in ``batch.features`` (the query of prompt-pool methods), and the engine calls
            ``predict(x, query=features)``; one backbone pass per step instead of two. Raw
            inputs, so it implies ``cache_features = False`` (setting ``True`` is refused).
    """

    supported_scenarios: ClassVar[tuple[str, ...] | None] = None
    cache_features: ClassVar[bool | None] = None
    needs_query: ClassVar[bool] = False
    registered_name: ClassVar[str] = ""

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        unknown = [name for name in vars(cls) if (name.startswith("before_") or name.startswith("after_")) and name not in EVENT_HOOKS]
        if unknown:
            raise TypeError(f"{cls.__name__} defines {unknown}, which the engine never calls; the hooks are {sorted(EVENT_HOOKS)}")
        if "frozen_features" in vars(cls):  # the attribute's former name
            raise TypeError(f"{cls.__name__} sets frozen_features, which is now called cache_features; rename it")
        if cls.needs_query and cls.cache_features:
            raise TypeError(f"{cls.__name__} sets needs_query, so its batches hold raw inputs; drop cache_features = True")
        if cls.needs_query and "query" not in inspect.signature(cls.predict).parameters:
            raise TypeError(
                f"{cls.__name__} sets needs_query, so the engine calls predict(x, query=...); give its predict a query argument"
            )

    def __init__(self, backbone: Backbone):
        super().__init__()
        self.backbone = backbone
        self.head = LinearHead(backbone.feature_dim)
        self._data: DataAccess | None = None
        self._uses_features: bool | None = None
        self.epoch = 0  # the engine sets the current training epoch (0-based) before each epoch
        self.planned_steps: int | None = None  # the engine sets the experience's optimizer steps before its first epoch
        self.experience: Experience | None = None  # the experience under way (set by the base before_experience)

    # ------------------------------------------------------------------ engine services

    @property
    def uses_features(self) -> bool:
        """Whether batches carry cached backbone features instead of raw inputs.

        Decided once per experience (the engine calls :meth:`refresh_input_mode` after
        ``before_experience``), since a method may unfreeze its backbone there.
        """
        if self._uses_features is None:
            cache = self.backbone.frozen if self.cache_features is None else self.cache_features
            self._uses_features = cache and not self.needs_query  # a query method reads raw inputs
        return self._uses_features

    def refresh_input_mode(self) -> None:
        """Re-decide :attr:`uses_features` (after the backbone was frozen or unfrozen).

        Call it whenever the backbone's weights or trainability change: the feature cache is
        then re-keyed to the current weights, so cached features never outlive an adaptation.
        """
        self._uses_features = None
        if self._data is not None:
            self._data.refresh_cache(self.uses_features or self.needs_query)

    @property
    def device(self) -> torch.device:
        return next(self.parameters(), torch.empty(0)).device

    def attach(self, data: DataAccess) -> None:
        """Called by the engine: gives the strategy access to batched (cached) data."""
        self._data = data

    def batches(self, view: DataView, batch_size: int | None = None, shuffle: bool = False, shard: bool = False) -> Iterator[Batch]:
        """Iterate over ``view`` as the engine does (features or raw inputs, on the device).

        Use it for passes a method makes on its own: prototypes, Fisher information, statistics.
        ``shard=True`` yields only this rank's share of every batch in a data-parallel run (the
        whole view in one process): the method must then combine the ranks' results itself,
        e.g. with :meth:`ClassStatistics.gathered <clpeft.components.ClassStatistics.gathered>`.
        """
        if self._data is None:
            raise RuntimeError("the strategy is not attached to an engine yet")
        batches = self._data.batches(
            view,
            batch_size=batch_size,
            shuffle=shuffle,
            uses_features=self.uses_features,
            with_query=self.needs_query,
            shard=shard,
        )
        return (batch for batch in batches if len(batch.y))

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """Features of a batch: ``x`` itself when it already holds cached features."""
        return x if self.uses_features else self.backbone(x)

    # ------------------------------------------------------------------ hooks

    def before_experience(self, exp: Experience) -> None:
        """New classes / a new domain are known here. Default: record ``exp`` as :attr:`experience`, grow the head."""
        self.experience = exp
        self.head.grow_to(exp.n_classes_seen)

    def train_data(self, exp: Experience) -> DataView:
        """The data trained on during ``exp`` (replay adds its memory here)."""
        return exp.train

    def training_step(self, batch: Batch) -> torch.Tensor:
        """Loss of one mini-batch; the engine does backward and the optimizer step."""
        return F.cross_entropy(self.predict(batch.x), batch.y)

    def after_training_step(self) -> bool:
        """After each optimizer step, with the step's gradients still in place. Default: nothing.

        Return True when trainable parameters were replaced by new ones under the same names (a
        LoRA rank grown by importance, as in IncreLoRA): the engine then hands them to the
        optimizer with their predecessors' state, zero-padded to the new sizes
        (:func:`~clpeft.resizing.replace_parameters`) and, with several ranks, rebuilds the
        DistributedDataParallel wrapper. Decisions taken here must be the same on every rank
        (base them on the all-reduced gradients, not on a rank's own batch).
        """
        return False

    def before_epoch(self, exp: Experience, epoch: int) -> None:
        """At the start of every training epoch of ``exp`` (``self.epoch`` is already ``epoch``)."""

    def after_backward(self) -> None:
        """After each backward pass, with the gradients in place, before clipping and the optimizer
        step: project or mask gradients here (A-GEM, GEM). Under ``torchrun`` the gradients are
        already averaged over the ranks."""

    def after_epoch(self, exp: Experience, epoch: int) -> None:
        """At the end of every training epoch of ``exp``."""

    def after_experience(self, exp: Experience) -> None:
        """After training on ``exp`` (classifier alignment, prototypes, memory update)."""

    def before_evaluation(self, exp: Experience) -> None:
        """Before the accuracy on every experience's test data is measured after training ``exp``."""

    def after_evaluation(self, exp: Experience, row: list[float]) -> None:
        """After that evaluation; ``row[j]`` is the accuracy on experience ``j``'s test data."""

    def predict(self, x: torch.Tensor, query: torch.Tensor | None = None) -> torch.Tensor:
        """Logits over every class seen so far.

        ``query`` is passed only to a strategy with ``needs_query = True``: the frozen backbone's
        cached features of ``x`` (the query of a prompt pool). Such a strategy must accept it; the
        others may keep the one-argument form, which the engine then uses.
        """
        return self.head(self.embed(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Calling the strategy is ``predict`` (so ``torch.func.functional_call`` works on it)."""
        return self.predict(x)

    def adapt(self, x: torch.Tensor) -> torch.Tensor:
        """Test-time adaptation: an unlabeled batch in, logits out. Default: no adaptation.

        Called by the engine for every batch of a test-time-adaptation domain, in stream order,
        under ``torch.enable_grad()``, with the inputs only: the labels stay with the engine's
        scorer, and the experiences handed to the hooks have ``test=None``. The method runs its
        own optimizer steps here, on the parameters it chooses (BN affine parameters for Tent).
        The returned logits are this batch's predictions, scored online.
        """
        return self.predict(x)

    def param_groups(self, lr: float) -> list[dict]:
        """Optimizer parameter groups; override for per-module learning rates."""
        return [{"params": [p for p in self.parameters() if p.requires_grad], "lr": lr}]

    def train(self, mode: bool = True) -> Strategy:
        """``nn.Module.train``; a net sharded by ``train.sharding: fsdp`` refreshes its whole state for evaluation (:mod:`clpeft.fsdp`)."""
        super().train(mode)
        fsdp.follow_mode(self, mode)
        return self

    # ------------------------------------------------------------------ reporting

    def final_metrics(self) -> dict[str, float]:
        """Metrics the method measures once the stream is over, added to ``metrics.json``'s ``metrics``
        (e.g. a generative model's perplexity on general text before and after the stream). Default: none."""
        return {}

    def count_parameters(self) -> dict[str, int]:
        """Trainable and total parameter counts."""
        params = list(self.parameters())
        return {
            "trainable": sum(p.numel() for p in params if p.requires_grad),
            "total": sum(p.numel() for p in params),
        }
