"""The classifier-side options that prompt, LoRA and merging strategies share, built once.

Three options change how a strategy's growing linear head is trained and read, whatever trains
the features: ``train_mask`` (the official prompt-method code's class mask,
:class:`~clpeft.components.heads.class_mask.ClassMask`), ``align`` (SLCA's classifier alignment,
Zhang et al., ICCV 2023, https://arxiv.org/abs/2303.05118, section 4.2:
:class:`~clpeft.components.heads.alignment.AlignedHead`) and ``drift_compensation`` (semantic
drift compensation of the stored class means, Yu et al., CVPR 2020,
https://arxiv.org/abs/2004.00440, eq. 8-9). They are one typed block, :class:`HeadOptions`,
which a strategy takes as one parameter (users write its fields as flat keys of ``strategy``,
:func:`clpeft.schema.flat_options`), and one module, :class:`HeadTraining`, which the strategy
calls at four points:

* ``before_experience``: :meth:`HeadTraining.start` (the mask's classes; SDC's features before
  training);
* ``training_step``: :meth:`HeadTraining.loss` (cross-entropy of the masked logits);
* ``after_experience``: :meth:`HeadTraining.finish` (class statistics, then re-alignment);
* ``predict``: calling it (the aligned copy once it covers every class, else the trained head).

The strategy hands over its ``batches`` service and the function that turns a batch into the
features its head reads; the pass over the experience's training data is made here, and only
when something consumes it (alignment on).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator

import torch
from pydantic import Field, model_validator

from clpeft.components.heads.alignment import AlignedHead
from clpeft.components.heads.class_mask import ClassMask
from clpeft.components.heads.classifiers import LinearHead
from clpeft.data import Batch, DataView
from clpeft.errors import UserError
from clpeft.experience import Experience
from clpeft.schema import Options

Batches = Callable[..., Iterable[Batch]]  # a strategy's ``batches(view, shard=True)``
Features = Callable[[Batch], torch.Tensor]  # a batch -> the features the head reads


class HeadOptions(Options):
    """How a strategy's head trains and predicts: the class mask, SLCA's alignment, SDC."""

    train_mask: bool = Field(
        True,
        description="restrict the cross-entropy to the current experience's classes "
        "(the official prompt-method code's train_mask; SLCA also keeps the older classes' rows "
        "fixed).",
    )
    align: bool = Field(
        False,
        description="predict with a copy of the head re-trained after every experience on "
        "sampled class-Gaussian features (SLCA's classifier alignment, ``AlignedHead``; LAE aligns "
        "one copy per expert).",
    )
    drift_compensation: bool = Field(
        False,
        description="with ``align``, move the stored class means by the drift "
        "of the current experience's features (SDC, Yu et al. 2020; ``AlignedHead``).",
    )

    @model_validator(mode="after")
    def _drift_compensation_needs_alignment(self) -> HeadOptions:
        if self.drift_compensation and not self.align:
            raise UserError(
                "needs align: true (it moves the class statistics that the alignment samples from)", key="strategy.drift_compensation"
            )
        return self


class HeadTraining(AlignedHead):
    """A strategy's classifier side: the training-time class mask and the aligned copy of its head.

    An :class:`~clpeft.components.heads.alignment.AlignedHead` (its state: the aligned copy and
    the class statistics; ``enabled`` is ``options.align``) that also holds the
    :class:`~clpeft.components.heads.class_mask.ClassMask` and makes the pass over an
    experience's training data that the alignment reads.

    Args:
        dim: feature dimension read by the head.
        options: the strategy's :class:`HeadOptions`.
        **alignment: arguments of :class:`~clpeft.components.heads.alignment.ClassifierAlignment`
            (SLCA's defaults otherwise).
    """

    def __init__(self, dim: int, options: HeadOptions, **alignment):
        super().__init__(dim, enabled=options.align, drift_compensation=options.drift_compensation, **alignment)
        self.mask = ClassMask(options.train_mask)

    def start(self, exp: Experience, batches: Batches, features: Features) -> None:
        """Before training on ``exp``: its classes for the mask and, with drift compensation, its
        training features under the current model (SDC's ``z^{t-1}``)."""
        self.mask.start(exp.classes_in_this_experience)
        self.track(_labelled(batches, exp.train, features))

    def loss(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of ``logits`` masked to the current experience's classes (with ``train_mask``)."""
        return self.mask.loss(logits, targets)

    def finish(self, trained: LinearHead, exp: Experience, batches: Batches, features: Features) -> None:
        """After training on ``exp``: store its classes' feature statistics and re-align a copy of ``trained``."""
        self.update(trained, _labelled(batches, exp.train, features), exp.index)


def _labelled(batches: Batches, view: DataView, features: Features) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``(features, labels)`` of ``view``, this rank's share; read only when consumed."""
    for batch in batches(view, shard=True):
        yield features(batch), batch.y
