"""DARE: drop and rescale task-vector entries before merging.

Yu et al., "Language Models are Super Mario: Absorbing Abilities from Homologous Models as a
Free Lunch", ICML 2024, https://arxiv.org/abs/2311.03099, Section 3: each entry of a task
vector is dropped with probability ``p`` and the rest are multiplied by ``1 / (1 - p)``, which
keeps the expected task vector; the sparsified vectors are then merged by task arithmetic
(``consensus="sum"``, peft's ``dare_linear``) or by TIES' sign election and disjoint mean
(``consensus="ties"``, peft's ``dare_ties``, without TIES' magnitude trim, so TIES'
``trim_scope`` has no counterpart here: each entry is dropped on its own, whatever the scope).
The paper's expectation ``E[tau_hat] = tau`` and the survivors' ``tau / (1 - p)`` are checked by
fixed-seed statistical tests (tests/reference/test_merging.py).

The drop mask is drawn from a generator the engine seeds from the merge seed and the tensor's
name, so a merge is reproducible and independent of the order tensors are processed in; CPU
and CUDA generators produce different masks for the same seed.
"""

from __future__ import annotations

from typing import Annotated

import torch
from pydantic import Field

from clpeft.merging.methods.generalized import Consensus, Scale, Weights, combine, task_coefficients
from clpeft.merging.methods.sparsify import drop_and_rescale_
from clpeft.merging.registry import merge_method

DropRate = Annotated[float, Field(ge=0.0, lt=1.0, description="p: probability of dropping each task-vector entry")]


@merge_method("dare", reference_url="https://arxiv.org/abs/2311.03099")
def dare(
    task_vectors: torch.Tensor,
    *,
    drop_rate: DropRate = 0.9,
    rescale: bool = True,
    consensus: Consensus = "sum",
    scale: Scale = 1.0,
    weights: Weights = None,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """DARE: drop entries with probability p, rescale by 1/(1-p), then sum or TIES-merge (Yu et al., ICML 2024)."""
    drop_and_rescale_(task_vectors, drop_rate, rescale, generator)
    return combine(task_vectors, task_coefficients(task_vectors, scale, weights), consensus)
