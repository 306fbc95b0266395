"""What the merge methods that need data share: which tensors they merge, and the examples they see.

Fisher merging and RegMean compute a statistic of each fine-tuned model on its own task's data
(a diagonal Fisher, the inputs' Gram matrices) before merging; both honour the merge rules
(:mod:`~clpeft.merging.rules`) as every method does, and both take a limited number of
examples from each task's data loader.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from clpeft.errors import UserError
from clpeft.merging.io import StateDictSource
from clpeft.merging.rules import MergeRules, plan

__all__ = ["ModelPlan", "examples_of", "plan_state_dicts"]


@dataclass(frozen=True)
class ModelPlan:
    """The tensors a data-driven method merges, and the output tensors it does not.

    Attributes:
        names: tensors the method merges.
        fixed: output tensors copied from the base, or averaged over the fine-tunes
            (normalisation statistics, as for every method); skipped tensors are absent.
    """

    names: list[str]
    fixed: dict[str, torch.Tensor]


def plan_state_dicts(
    base: Mapping[str, torch.Tensor], finetuned: Sequence[Mapping[str, torch.Tensor]], rules: MergeRules | None
) -> ModelPlan:
    """The plan of a merge of in-memory state dicts under ``rules``."""
    sources = [StateDictSource(m, f"model {i}") for i, m in enumerate(finetuned)]
    jobs = plan(StateDictSource(base, "the base state dict"), sources, rules or MergeRules())
    fixed = {job.name: base[job.name] for job in jobs if not job.merge}
    for job in jobs:
        if job.average:
            fixed[job.name] = torch.stack([m[job.name].to(base[job.name].dtype) for m in finetuned]).mean(dim=0)
    return ModelPlan([job.name for job in jobs if job.merge and not job.average], fixed)


def examples_of(loader: Iterable[Any], limit: int | None, device: torch.device, *, key: str = "loaders") -> Iterator[torch.Tensor]:
    """The input batches of one pass over ``loader`` (a batch may be ``(inputs, labels)``), on
    ``device``, cut to ``limit`` examples in all (None: the whole pass).

    Raises:
        UserError: when the loader yields no example.
    """
    seen = 0
    for batch in loader:
        inputs = batch[0] if isinstance(batch, tuple | list) else batch
        if limit is not None:
            inputs = inputs[: limit - seen]
        seen += len(inputs)
        yield inputs.to(device)
        if limit is not None and seen >= limit:
            break
    if seen == 0:
        raise UserError("a data loader yields no examples; give each model a loader of its task's inputs", key=key)
