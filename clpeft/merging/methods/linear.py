"""Linear merge: a weighted average of the models themselves (a "soup" with weights).

Wortsman et al., "Model soups: averaging weights of multiple fine-tuned models improves
accuracy without increasing inference time", ICML 2022, https://arxiv.org/abs/2203.05482 (the
reference mergekit's ``linear`` cites). With weights ``w_k`` for the fine-tuned models and
``w_0`` for the base, ``theta = (w_0 theta_0 + sum_k w_k theta_k) / (w_0 + sum_k w_k)``, which
is ``theta_0 + sum_k w_k tau_k / (w_0 + sum_k w_k)``: an average of models, so the weights are
relative (``weights: [2, 1]`` is ``[2/3, 1/3]``), unlike task arithmetic's, which scale task
vectors. ``base_weight`` is mergekit's weight of the base model when the base is listed among
its ``models``; 0 (the default) leaves the base out of the average, as mergekit does otherwise.

mergekit's ``normalize: false`` sums the weighted models without dividing, which also scales
the base by ``w_0 + sum_k w_k``; clpeft merges task vectors on the base, so ``normalize:
false`` is accepted only where it changes nothing (weights summing to 1) and is otherwise an
error naming the alternatives (a deliberate difference, docs/merging.md). Equal to mergekit's
``linear`` (tests/reference/test_mergekit_methods.py).
"""

from __future__ import annotations

from typing import Annotated

import torch
from pydantic import Field

from clpeft.errors import UserError
from clpeft.merging.methods.generalized import combine, task_coefficients
from clpeft.merging.registry import merge_method

ModelWeights = Annotated[
    list[float] | None,
    Field(description="w_k: relative weight of each fine-tuned model in the average, in the order of the models (default: all 1)"),
]
BaseWeight = Annotated[float, Field(description="w_0: weight of the base model itself in the average (mergekit's base listed in models)")]


@merge_method("linear", reference_url="https://arxiv.org/abs/2203.05482", linear=True)
def linear(
    task_vectors: torch.Tensor,
    *,
    weights: ModelWeights = None,
    base_weight: BaseWeight = 0.0,
    normalize: bool = True,
) -> torch.Tensor:
    """Weighted average of the models: theta = (w_0 theta_0 + sum_k w_k theta_k) / sum w (Wortsman et al., ICML 2022)."""
    coefficients = task_coefficients(task_vectors, 1.0, weights)
    total = base_weight + float(coefficients.sum())
    if normalize and total == 0.0:
        raise UserError("the weights (with base_weight) sum to 0, so their average is undefined; give weights with a non-zero sum")
    if not normalize and abs(total - 1.0) > 1e-6:
        raise UserError(
            f"normalize: false with weights summing to {total:g} would scale the base model too (theta = sum_k w_k theta_k); "
            "use normalize: true, weights that sum to 1, or task_arithmetic to add weighted task vectors",
            key="parameters.normalize",
        )
    return combine(task_vectors, coefficients.div_(total) if normalize else coefficients, "sum")
