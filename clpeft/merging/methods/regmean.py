"""RegMean: merge each linear layer by the regression that fits every model's outputs on its data.

Jin, Ren, Preotiuc-Pietro and Cheng, "Dataless Knowledge Fusion by Merging Weights of Language
Models", ICLR 2023, https://arxiv.org/abs/2212.09849. A linear layer ``y = W x`` of
model ``k`` sees inputs ``X_k`` (one row per token) on task ``k``'s data; the weight that
minimises ``sum_k ||X_k W^T - X_k W_k^T||^2`` is

    W*^T = (sum_k G_k)^(-1) sum_k G_k W_k^T,    G_k = X_k^T X_k / n_k,

and the paper shrinks the off-diagonal entries of each Gram matrix, ``G~_k = alpha G_k +
(1 - alpha) diag(G_k)``, to regularise the inverse. Every other merged tensor (biases, norms,
embeddings) is the fine-tunes' plain mean.

As FusionBench's ``regmean_merging`` (after MergeLM), the Gram matrices are collected by forward
hooks on the ``nn.Linear`` modules of ``model`` (run with each fine-tune's weights by
``torch.func.functional_call``) and averaged over the rows they saw (``n_k``), and ``alpha`` is
its ``reduce_non_diagonal_ratio``; equal to its ``merging_with_regmean_weights`` given the same
Gram matrices (tests/reference/test_fusionbench_methods.py). clpeft accumulates the Gram
matrices and solves the linear system in float64 (a Gram matrix squares its inputs' condition
number) instead of inverting in the inputs' dtype. Default ``alpha`` 1, the exact regression (FusionBench's and
MergeLM's default). A summed Gram matrix that is numerically singular (``matrix_rank`` below its
size: fewer rows than input features, or inputs confined to a subspace, as after a LayerNorm
without bias) is a one-line error asking for ``alpha < 1``, where FusionBench's inverse returns
whatever the round-off gives.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from clpeft.errors import UserError
from clpeft.merging.methods.data_plan import examples_of, plan_state_dicts
from clpeft.merging.registry import merge_method
from clpeft.merging.rules import MergeRules

__all__ = ["RegMeanResult", "input_grams", "regmean"]


@dataclass(frozen=True)
class RegMeanResult:
    """The merged model and the Gram matrices that weighted it.

    Attributes:
        state_dict: the merged state dict (skipped tensors left out).
        grams: per model, linear weight name -> ``G_k`` (before the off-diagonal shrinking).
    """

    state_dict: dict[str, torch.Tensor]
    grams: list[dict[str, torch.Tensor]]


def input_grams(
    model: nn.Module, state_dict: Mapping[str, torch.Tensor], weights: Sequence[str], batches: Iterable[Any]
) -> dict[str, torch.Tensor]:
    """``G = X^T X / n`` (float64) of the inputs of every ``nn.Linear`` of ``model`` whose weight is in
    ``weights``, over the batches, with ``model`` running ``state_dict``'s tensors."""
    sums: dict[str, torch.Tensor] = {}
    rows: dict[str, int] = {}

    def hook(name: str):
        def record(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).to(torch.float64)
            gram = x.T @ x
            sums[name] = sums[name] + gram if name in sums else gram
            rows[name] = rows.get(name, 0) + x.shape[0]

        return record

    wanted = set(weights)
    linears = {f"{name}.weight": m for name, m in model.named_modules() if isinstance(m, nn.Linear) and f"{name}.weight" in wanted}
    handles = [module.register_forward_hook(hook(name)) for name, module in linears.items()]
    try:
        with torch.no_grad():
            for inputs in batches:
                torch.func.functional_call(model, dict(state_dict), (inputs,))
    finally:
        for handle in handles:
            handle.remove()
    return {name: sums[name] / rows[name] for name in sums}


@merge_method("regmean", reference_url="https://arxiv.org/abs/2212.09849", scope="model")
def regmean(
    base: Mapping[str, torch.Tensor],
    finetuned: Sequence[Mapping[str, torch.Tensor]],
    *,
    model: nn.Module,
    loaders: Sequence[Iterable[Any]],
    examples: int | None = None,
    alpha: float = 1.0,
    rules: MergeRules | None = None,
) -> RegMeanResult:
    """RegMean: each linear layer solved from the models' input Gram matrices, the rest averaged (Jin et al., ICLR 2023).

    Args:
        base: the pretrained state dict (only its tensors' names, dtypes and the rules' copies).
        finetuned: the fine-tuned state dicts; their linear weights are ``(out, in)``.
        model: the architecture whose ``nn.Linear`` inputs are recorded (run with each
            fine-tune's tensors; its own are used for any name a state dict lacks).
        loaders: one iterable of task ``k``'s input batches per model (labels are ignored).
        examples: examples taken from each loader (None: one whole pass).
        alpha: kept share of the Gram matrices' off-diagonal entries (1: the exact regression).
        rules: tensors to skip or keep from the base, as for every method.
    """
    if len(loaders) != len(finetuned):
        raise UserError(f"got {len(loaders)} data loaders for {len(finetuned)} models; give one per model", key="loaders")
    if not 0.0 <= alpha <= 1.0:
        raise UserError(f"should lie in [0, 1], got {alpha!r}", key="alpha")
    planned = plan_state_dicts(base, finetuned, rules)
    device = next(iter(base.values())).device
    grams = [input_grams(model, m, planned.names, examples_of(loader, examples, device)) for m, loader in zip(finetuned, loaders)]
    state = dict(planned.fixed)
    for name in planned.names:
        stacked = torch.stack([m[name].detach().to(base[name].dtype) for m in finetuned])
        if name not in grams[0]:
            state[name] = stacked.mean(dim=0)
            continue
        shrunk = [alpha * g + (1.0 - alpha) * torch.diag(g.diagonal()) for g in (gs[name] for gs in grams)]
        total = sum(shrunk)
        if int(torch.linalg.matrix_rank(total, hermitian=True)) < total.shape[0]:
            raise UserError(
                f"the summed input Gram matrix of '{name}' is singular (its inputs span fewer than {total.shape[0]} "
                "directions, e.g. a LayerNorm without bias before it, or fewer rows than features); lower alpha below 1 "
                "or give more examples",
                key="alpha",
            )
        solved = torch.linalg.solve(total, sum(g @ w.T.to(g.dtype) for g, w in zip(shrunk, stacked)))
        state[name] = solved.T.to(base[name].dtype).contiguous()
    return RegMeanResult(state, grams)
