"""Which tensors are merged, which are copied from the base, which are left out.

Every tensor of the base checkpoint gets one action:

* ``skip``: left out of the output. For tensors that have no meaning once merged, such as
  task-specific classification heads (``skip: ["head.*"]``).
* ``keep_base``: copied unmerged from the base. Chosen by a rule, and automatically for
  integer and boolean tensors (buffers such as position ids), for empty tensors and for
  BatchNorm's ``num_batches_tracked`` (also when stored as a float).
* ``average``: normalisation statistics, the buffers whose names end in ``running_mean``,
  ``running_var`` (PyTorch's BatchNorm and InstanceNorm) or ``moving_mean``,
  ``moving_variance`` (Keras exports). They are not weights, so they are never merged as task
  vectors (scaled, trimmed or dropped: task arithmetic once turned a variance of 100 into -97,
  issue 20); whatever the method, the output holds the plain mean of the fine-tuned models'
  statistics, and a merged variance below zero is an error. The mean is only an estimate of
  the merged model's statistics: recompute them on data where accuracy matters.
* ``merge``: everything else, combined by the merge method. Every full fine-tune must then
  hold the tensor (as for ``average``) with the base's shape and a floating dtype; anything
  else is an error that names the tensor, the checkpoint and the rule that would resolve it.
  Nothing is dropped or truncated silently: a head with a different number of classes, or an
  embedding resized for new tokens, must be named in a rule.

Rules are shell-style globs (:func:`fnmatch.fnmatchcase`) on tensor names; ``skip`` wins over
``keep_base``, which wins over the built-in ``average`` (``keep_base: ["*.running_*"]`` keeps
the base's statistics). LoRA adapters only contribute to the layers they adapt; the base's
other tensors are copied.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from clpeft.errors import UserError
from clpeft.merging.io import TensorInfo, TensorSource
from clpeft.merging.lora import LoraAdapter

__all__ = ["MergeRules", "TensorJob", "plan"]

Action = Literal["skip", "keep_base", "average", "merge"]

_COUNTERS = ("num_batches_tracked",)  # copied from the base
_STATISTICS = ("running_mean", "running_var", "moving_mean", "moving_variance")  # averaged
_VARIANCES = ("running_var", "moving_variance")  # averaged, and never negative
_MERGED: frozenset[Action] = frozenset({"average", "merge"})  # actions that need every fine-tune's tensor


class MergeRules(BaseModel):
    """Explicit rules for tensors that must not be merged."""

    model_config = ConfigDict(extra="forbid")

    skip: list[str] = Field(default_factory=list, description="globs of tensors left out of the output (e.g. task-specific heads)")
    keep_base: list[str] = Field(default_factory=list, description="globs of tensors copied unmerged from the base")

    def action(self, name: str, info: TensorInfo) -> Action:
        """The action for one base tensor."""
        if any(fnmatchcase(name, p) for p in self.skip):
            return "skip"
        if (
            any(fnmatchcase(name, p) for p in self.keep_base)
            or not info.dtype.is_floating_point
            or info.numel == 0
            or name.endswith(_COUNTERS)
        ):
            return "keep_base"
        return "average" if name.endswith(_STATISTICS) else "merge"


@dataclass(frozen=True)
class TensorJob:
    """One output tensor: its name, the base's dtype and shape, whether it is merged, and whether
    it is merged as the plain mean of the fine-tuned tensors instead of by the method."""

    name: str
    info: TensorInfo
    merge: bool
    average: bool = False

    @property
    def variance(self) -> bool:
        """A merged variance statistic: the output must not hold negative values."""
        return self.average and self.name.endswith(_VARIANCES)


def plan(base: TensorSource, models: Sequence[TensorSource | LoraAdapter], rules: MergeRules) -> list[TensorJob]:
    """Check the models against the base and list the output tensors, in the base's order.

    Raises:
        UserError: for a tensor the base lacks, a missing tensor, a shape or dtype mismatch,
            or a mix of LoRA adapters and full checkpoints; the message names the tensor,
            the checkpoint and the fix.
    """
    if not models:
        raise UserError("no models to merge: give at least one fine-tuned checkpoint", key="models")
    adapters = [m for m in models if isinstance(m, LoraAdapter)]
    if adapters and len(adapters) != len(models):
        raise UserError(
            f"cannot mix LoRA adapters ({adapters[0].description}) with full checkpoints in one merge; "
            "merge the adapters into their base first, or merge only adapters",
            key="models",
        )
    base_keys = set(base.keys())
    actions = {name: rules.action(name, base.info(name)) for name in base.keys()}
    for model in models:
        if isinstance(model, LoraAdapter):
            _check_adapter(model, base, actions, rules)
        else:
            _check_full(model, base, actions, rules, base_keys)
    adapted = set().union(*(a.layers for a in adapters)) if adapters else base_keys
    jobs = []
    for name, action in actions.items():
        if action == "skip":
            continue
        merged = action in _MERGED and name in adapted
        jobs.append(TensorJob(name, base.info(name), merged, average=merged and action == "average"))
    return jobs


def _check_full(model: TensorSource, base: TensorSource, actions: dict[str, Action], rules: MergeRules, base_keys: set[str]) -> None:
    model_keys = set(model.keys())
    for name in model.keys():
        if name not in base_keys and rules.action(name, model.info(name)) != "skip":
            raise UserError(
                f"tensor '{name}' of {model.description} is not in the base {base.description}; "
                f"if it is task-specific (e.g. a classification head) add a rule skip: ['{name}']"
            )
    for name, action in actions.items():
        if action not in _MERGED:
            continue
        if name not in model_keys:
            raise UserError(
                f"tensor '{name}' is missing from {model.description}; add it to keep_base to copy "
                "the base's value, or to skip to leave it out"
            )
        mine, theirs = base.info(name), model.info(name)
        if mine.shape != theirs.shape:
            raise UserError(
                f"tensor '{name}' has shape {list(theirs.shape)} in {model.description} but {list(mine.shape)} "
                f"in the base {base.description}; tensors of different shapes (task-specific heads, resized "
                "embeddings) cannot be merged: add it to skip or keep_base"
            )
        if not theirs.dtype.is_floating_point:
            raise UserError(
                f"tensor '{name}' is {theirs.dtype} in {model.description} but floating-point in the base; add it to keep_base or skip"
            )


def _check_adapter(adapter: LoraAdapter, base: TensorSource, actions: dict[str, Action], rules: MergeRules) -> None:
    for name, key in adapter.other.items():
        action = actions[name] if name in actions else rules.action(name, adapter.source.info(key))
        if action in _MERGED:
            raise UserError(
                f"{adapter.description} holds a full tensor for '{name}' (modules_to_save?) besides its LoRA "
                "factors; LoRA merging combines factors only: add it to skip or keep_base"
            )
    for name in adapter.layers:
        if name not in actions:
            raise UserError(f"{adapter.description} adapts '{name}', which the base {base.description} lacks")
        if actions[name] not in _MERGED:
            continue
        shape = adapter.delta_shape(name)
        if shape != base.info(name).shape:
            raise UserError(
                f"{adapter.description}: the LoRA delta of '{name}' has shape {list(shape)} but the base "
                f"tensor has {list(base.info(name).shape)}; this adapter was trained on a different model"
            )
