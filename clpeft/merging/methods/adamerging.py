"""AdaMerging: merging coefficients learned by entropy minimisation on unlabeled data.

Yang et al., "AdaMerging: Adaptive Model Merging for Multi-Task Learning", ICLR 2024,
https://arxiv.org/abs/2310.02575. Task arithmetic with one coefficient per task,

    task-wise:   theta   = theta_0   + sum_k lambda_k   tau_k,
    layer-wise:  theta^l = theta_0^l + sum_k lambda_k^l tau_k^l   (one lambda per task and tensor l),

where the coefficients minimise the Shannon entropy of the merged model's predictions on
unlabeled test batches of every task (the paper's surrogate for the unavailable labels):

    min_lambda  sum_k  mean_{x in B_k}  H(softmax(f_k(x; theta(lambda)))),   H(p) = -sum_c p_c log p_c.

Every task keeps its own classification head ``f_k`` (heads are not merged); normalisation
statistics are averaged, not learned (:mod:`~clpeft.merging.rules`). As in the
authors' code, the coefficients start at ``0.3``, are clamped to ``[0, 1]`` in the forward
pass, and are trained with Adam (lr 1e-3, betas 0.9/0.999), one batch per task per step;
the paper runs 500 steps with batches of 16.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from clpeft.errors import UserError
from clpeft.merging.io import StateDictSource
from clpeft.merging.registry import merge_method
from clpeft.merging.rules import MergeRules, plan

__all__ = ["AdaMergingResult", "Forward", "adamerging", "entropy", "functional_forward"]

Forward = Callable[[Mapping[str, torch.Tensor], int, Any], torch.Tensor]
"""``forward(state_dict, task, inputs) -> logits``: the model with task ``task``'s head."""


@dataclass(frozen=True)
class AdaMergingResult:
    """The merged model and what was learned.

    Attributes:
        state_dict: ``theta(lambda)`` with the learned coefficients (skipped tensors left out).
        coefficients: merged tensor name -> ``[lambda_1, ..., lambda_K]`` (clamped to [0, 1]);
            task-wise merging gives every tensor the same list.
        entropy: the objective (summed mean entropy over tasks) before each step.
    """

    state_dict: dict[str, torch.Tensor]
    coefficients: dict[str, list[float]]
    entropy: list[float]


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Per-sample Shannon entropy of ``softmax(logits)`` over the last dimension."""
    log_p = logits.log_softmax(dim=-1)
    return -(log_p.exp() * log_p).sum(dim=-1)


def functional_forward(model: nn.Module, heads: Sequence[Callable[[torch.Tensor], torch.Tensor]]) -> Forward:
    """A :data:`Forward` that runs ``model`` with the given weights, then task ``task``'s head.

    ``model``'s own parameters are used for any name missing from the state dict.
    """

    def forward(state_dict: Mapping[str, torch.Tensor], task: int, inputs: Any) -> torch.Tensor:
        return heads[task](torch.func.functional_call(model, dict(state_dict), (inputs,)))

    return forward


@merge_method("adamerging", reference_url="https://arxiv.org/abs/2310.02575", scope="model")
def adamerging(
    base: Mapping[str, torch.Tensor],
    finetuned: Sequence[Mapping[str, torch.Tensor]],
    *,
    forward: Forward,
    loaders: Sequence[Iterable[Any]],
    granularity: Literal["layer", "task"] = "layer",
    init: float = 0.3,
    steps: int = 500,
    lr: float = 1e-3,
    rules: MergeRules | None = None,
) -> AdaMergingResult:
    """AdaMerging: task- or layer-wise coefficients learned by entropy minimisation (Yang et al., ICLR 2024).

    Args:
        base: the pretrained state dict ``theta_0``.
        finetuned: the fine-tuned state dicts ``theta_k``.
        forward: runs the model on a batch with task ``k``'s head (see :func:`functional_forward`).
        loaders: one iterable of unlabeled batches per model, in the same order; a batch may
            be ``(inputs, labels)``, whose labels are ignored. Iterables are restarted when exhausted.
        granularity: ``"layer"`` (one ``lambda_k^l`` per tensor) or ``"task"`` (one ``lambda_k``).
        init: initial coefficients (the paper's prior, 0.3).
        steps: optimisation steps (500 in the paper).
        lr: Adam learning rate (1e-3 in the paper).
        rules: tensors to skip or keep from the base, as for every method.

    Returns:
        The merged state dict, the learned coefficients and the entropy curve.
    """
    if len(loaders) != len(finetuned):
        raise UserError(
            f"got {len(loaders)} data loaders for {len(finetuned)} models; give one per model", key="loaders"
        )
    base_source = StateDictSource(base, "the base state dict")
    jobs = plan(base_source, [StateDictSource(m, f"model {i}") for i, m in enumerate(finetuned)], rules or MergeRules())
    names = [job.name for job in jobs if job.merge and not job.average]
    fixed = {job.name: base[job.name] for job in jobs if not job.merge}
    for job in jobs:
        if job.average:  # normalisation statistics: the fine-tunes' mean (rules)
            fixed[job.name] = torch.stack([m[job.name].to(base[job.name].dtype) for m in finetuned]).mean(dim=0)
    task_vectors = {name: _task_vectors(name, base, finetuned) for name in names}
    device = next(iter(base.values())).device
    raw = torch.full(
        (len(names) if granularity == "layer" else 1, len(finetuned)), float(init), device=device, requires_grad=True
    )
    optimizer = torch.optim.Adam([raw], lr=lr, betas=(0.9, 0.999))

    def merged(coefficients: torch.Tensor) -> dict[str, torch.Tensor]:
        state = dict(fixed)
        for i, name in enumerate(names):
            c = coefficients[i if granularity == "layer" else 0].to(task_vectors[name].dtype)
            state[name] = base[name] + torch.tensordot(c, task_vectors[name], dims=1)
        return state

    batches = [_endless(loader, device) for loader in loaders]
    history = []
    for _ in range(steps):
        state = merged(raw.clamp(0.0, 1.0))
        loss = sum(entropy(forward(state, task, next(it))).mean() for task, it in enumerate(batches))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        history.append(loss.item())
    with torch.no_grad():
        learned = raw.clamp(0.0, 1.0)
        state = {name: t.detach().clone() for name, t in merged(learned).items()}
    rows = learned.tolist()
    coefficients = {name: rows[i if granularity == "layer" else 0] for i, name in enumerate(names)}
    return AdaMergingResult(state, coefficients, history)


def _task_vectors(
    name: str, base: Mapping[str, torch.Tensor], finetuned: Sequence[Mapping[str, torch.Tensor]]
) -> torch.Tensor:
    stacked = torch.stack([m[name].detach().to(base[name].dtype) for m in finetuned]) - base[name].detach()
    finite = torch.isfinite(stacked.flatten(1)).all(dim=1)
    if not finite.all():
        k = int((~finite).nonzero()[0])
        raise UserError(f"tensor '{name}' of model {k} (or of the base) holds NaN or infinite values")
    return stacked


def _endless(loader: Iterable[Any], device: torch.device) -> Iterator[Any]:
    """Inputs of every batch of ``loader``, restarting it when it runs out."""
    while True:
        empty = True
        for batch in loader:
            empty = False
            inputs = batch[0] if isinstance(batch, tuple | list) else batch
            yield inputs.to(device) if isinstance(inputs, torch.Tensor) else inputs
        if empty:
            raise UserError("a data loader given to adamerging yields no batches", key="loaders")
