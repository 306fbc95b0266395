"""Fisher merging: a per-parameter average of the models weighted by their diagonal Fisher.

Matena and Raffel, "Merging Models with Fisher-Weighted Averaging", NeurIPS 2022,
https://arxiv.org/abs/2111.09832: the Fisher-weighted average with the diagonal Fisher,

    theta*_j = sum_k lambda_k F_k,j theta_k,j / sum_k lambda_k F_k,j,
    F_k = (1 / N) sum_{n=1..N} E_{y ~ p(y | x_n; theta_k)} (grad_theta log p(y | x_n; theta_k))^2,

with ``F_k`` measured on ``N`` examples of task ``k`` under model ``k``. The expectation over
``y`` is exact: a sum over the classes weighted by the model's own probabilities (the paper's
"exact" Fisher, its official code's default for classifiers), one per-example gradient per class
(``torch.func.vmap`` of ``torch.func.grad``). A floor ``epsilon`` is added to every Fisher (the
official ``fisher_floor``, FusionBench's ``minimal_fisher_weight``, both 1e-6), so an entry that
no model's output depends on is the plain weighted average. ``lambda_k`` (``weights``) default
to equal; only their ratios matter.

Every task keeps its own head in ``forward`` (as for :mod:`~clpeft.merging.methods.adamerging`);
the Fisher is taken over every merged tensor. FusionBench (``fisher_merging``, after MergeLM)
instead squares one gradient per *batch* of ``sum_n sum_y sqrt(p_y) log p_y``, which mixes the
examples and classes of a batch (cross terms), and by default rescales each model by the inverse
norm of its Fisher (``normalize_fisher_weight``): not in the paper, not here. Given the same
Fishers, the merge equals FusionBench's ``merging_with_fisher_weights`` with
``normalize_fisher_weight=False`` (tests/reference/test_fusionbench_methods.py).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from clpeft.errors import UserError
from clpeft.merging.methods.adamerging import Forward
from clpeft.merging.methods.data_plan import examples_of, plan_state_dicts
from clpeft.merging.registry import merge_method
from clpeft.merging.rules import MergeRules

__all__ = ["FisherResult", "diagonal_fisher", "fisher"]


@dataclass(frozen=True)
class FisherResult:
    """The merged model and the Fishers that weighted it.

    Attributes:
        state_dict: ``theta*`` (skipped tensors left out).
        fishers: per model, merged tensor name -> its diagonal Fisher ``F_k`` (without the floor).
    """

    state_dict: dict[str, torch.Tensor]
    fishers: list[dict[str, torch.Tensor]]


def diagonal_fisher(
    state_dict: Mapping[str, torch.Tensor], names: Sequence[str], forward: Forward, task: int, batches: Iterable[torch.Tensor]
) -> dict[str, torch.Tensor]:
    """``F = (1 / N) sum_n sum_y p(y | x_n) (grad log p(y | x_n))^2`` of the tensors ``names``.

    ``forward(state_dict, task, inputs)`` gives the model's logits; the other tensors of
    ``state_dict`` are held fixed.
    """
    params = {name: state_dict[name].detach() for name in names}
    rest = {name: t.detach() for name, t in state_dict.items() if name not in params}

    def log_probability(weights: dict[str, torch.Tensor], example: torch.Tensor, label: int) -> torch.Tensor:
        return forward({**rest, **weights}, task, example[None])[0].log_softmax(dim=-1)[label]

    per_example_grad = torch.func.vmap(torch.func.grad(log_probability), in_dims=(None, 0, None))

    fisher = {name: torch.zeros_like(p) for name, p in params.items()}
    count = 0
    for inputs in batches:
        with torch.no_grad():
            probabilities = forward({**rest, **params}, task, inputs).softmax(dim=-1)
        for label in range(probabilities.shape[-1]):
            grads = per_example_grad(params, inputs, label)
            for name, grad in grads.items():
                fisher[name] += torch.tensordot(probabilities[:, label].to(grad.dtype), grad.square(), dims=1)
        count += len(inputs)
    return {name: f / count for name, f in fisher.items()}


@merge_method("fisher", reference_url="https://arxiv.org/abs/2111.09832", scope="model")
def fisher(
    base: Mapping[str, torch.Tensor],
    finetuned: Sequence[Mapping[str, torch.Tensor]],
    *,
    forward: Forward,
    loaders: Sequence[Iterable[Any]],
    examples: int | None = None,
    weights: list[float] | None = None,
    epsilon: float = 1e-6,
    rules: MergeRules | None = None,
) -> FisherResult:
    """Fisher merging: the models averaged per parameter, weighted by their diagonal Fisher (Matena and Raffel, NeurIPS 2022).

    Args:
        base: the pretrained state dict (only its tensors' names, dtypes and the rules' copies).
        finetuned: the fine-tuned state dicts ``theta_k``.
        forward: runs the model on a batch with task ``k``'s head
            (:func:`~clpeft.merging.methods.adamerging.functional_forward`).
        loaders: one iterable of task ``k``'s input batches per model (labels, if given, are
            ignored: the Fisher's ``y`` is drawn from the model).
        examples: ``N``, the examples taken from each loader (None: one whole pass).
        weights: ``lambda_k`` (default: equal).
        epsilon: floor added to every Fisher entry (1e-6, the official ``fisher_floor``).
        rules: tensors to skip or keep from the base, as for every method.
    """
    if len(loaders) != len(finetuned):
        raise UserError(f"got {len(loaders)} data loaders for {len(finetuned)} models; give one per model", key="loaders")
    if weights is not None and len(weights) != len(finetuned):
        raise UserError(f"has {len(weights)} entries for {len(finetuned)} models", key="weights")
    if examples is not None and (not isinstance(examples, int) or examples < 1):
        raise UserError(f"should be a whole number of examples >= 1, got {examples!r}", key="examples")
    planned = plan_state_dicts(base, finetuned, rules)
    device = next(iter(base.values())).device
    fishers = [
        diagonal_fisher(model, planned.names, forward, k, examples_of(loader, examples, device))
        for k, (model, loader) in enumerate(zip(finetuned, loaders))
    ]
    lambdas = [1.0] * len(finetuned) if weights is None else weights
    state = dict(planned.fixed)
    for name in planned.names:
        dtype = base[name].dtype
        weighted = [c * (f[name] + epsilon) for c, f in zip(lambdas, fishers)]
        numerator = sum(w * m[name].detach().to(w.dtype) for w, m in zip(weighted, finetuned))
        state[name] = (numerator / sum(weighted)).to(dtype)
    return FisherResult(state, fishers)
