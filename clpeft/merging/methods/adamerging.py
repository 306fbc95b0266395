"""AdaMerging: merging coefficients learned by entropy minimisation on unlabeled data.

Yang et al., "AdaMerging: Adaptive Model Merging for Multi-Task Learning", ICLR 2024,
https://arxiv.org/abs/2310.02575. Task arithmetic with one coefficient per task,

    task-wise:   theta   = theta_0   + sum_k lambda_k   tau_k,
    layer-wise:  theta^l = theta_0^l + sum_k lambda_k^l tau_k^l   (one lambda per task and tensor l),

where the coefficients minimise the Shannon entropy of the merged model's predictions on
unlabeled test batches of every task (the paper's surrogate for the unavailable labels):

    min_lambda  sum_k  mean_{x in B_k}  H(softmax(f_k(x; theta(lambda)))),   H(p) = -sum_c p_c log p_c.

Every task keeps its own classification head ``f_k`` (heads are not merged); normalisation
statistics are averaged, not learned (:mod:`~clpeft.merging.rules`).

As in the authors' code (``main_task_wise_adamerging.py``, ``main_layer_wise_adamerging.py``;
tests/reference/test_merging.py runs their training loop next to this one): the coefficients
start at the prior ``0.3``, are clamped to ``[0, 1]`` in the forward pass (the base keeps
coefficient 1), and are trained with Adam (lr 1e-3, betas 0.9/0.999, no weight decay) for
500 steps. Each step builds a new shuffled loader per task and takes its first two batches
of 16 (``if i > 0: break``); the objective is the sum over tasks and batches of each batch's
mean entropy, and one Adam step follows. Here every step starts a new pass over each loader
(``fresh_pass``) and takes its first ``batches`` batches: give shuffling loaders with batches
of 16 to draw as the reference does.
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
    batches: int = 2,
    fresh_pass: bool = True,
    rules: MergeRules | None = None,
) -> AdaMergingResult:
    """AdaMerging: task- or layer-wise coefficients learned by entropy minimisation (Yang et al., ICLR 2024).

    Args:
        base: the pretrained state dict ``theta_0``.
        finetuned: the fine-tuned state dicts ``theta_k``.
        forward: runs the model on a batch with task ``k``'s head (see :func:`functional_forward`).
        loaders: one iterable of unlabeled batches per model, in the same order (shuffling
            loaders with batches of 16, as the reference's); a batch may be ``(inputs, labels)``,
            whose labels are ignored.
        granularity: ``"layer"`` (one ``lambda_k^l`` per tensor) or ``"task"`` (one ``lambda_k``).
        init: initial coefficients (the reference's prior, 0.3).
        steps: optimisation steps (500 in the reference).
        lr: Adam learning rate (1e-3 in the reference).
        batches: batches of each task per step, their mean entropies summed (2 in the reference;
            a loader with fewer gives what it has).
        fresh_pass: start a new pass over every loader at each step, as the reference's new
            loader per step does (a shuffling loader then draws fresh batches every step);
            ``False`` continues where the last step stopped and restarts an exhausted loader.
        rules: tensors to skip or keep from the base, as for every method.

    Returns:
        The merged state dict, the learned coefficients and the entropy curve.
    """
    if not isinstance(batches, int) or batches < 1:
        raise UserError(f"should be a whole number of batches >= 1, got {batches!r}", key="batches")
    if len(loaders) != len(finetuned):
        raise UserError(f"got {len(loaders)} data loaders for {len(finetuned)} models; give one per model", key="loaders")
    base_source = StateDictSource(base, "the base state dict")
    jobs = plan(base_source, [StateDictSource(m, f"model {i}") for i, m in enumerate(finetuned)], rules or MergeRules())
    names = [job.name for job in jobs if job.merge and not job.average]
    fixed = {job.name: base[job.name] for job in jobs if not job.merge}
    for job in jobs:
        if job.average:  # normalisation statistics: the fine-tunes' mean (rules)
            fixed[job.name] = torch.stack([m[job.name].to(base[job.name].dtype) for m in finetuned]).mean(dim=0)
    task_vectors = {name: _task_vectors(name, base, finetuned) for name in names}
    device = next(iter(base.values())).device
    raw = torch.full((len(names) if granularity == "layer" else 1, len(finetuned)), float(init), device=device, requires_grad=True)
    optimizer = torch.optim.Adam([raw], lr=lr, betas=(0.9, 0.999))

    def merged(coefficients: torch.Tensor) -> dict[str, torch.Tensor]:
        state = dict(fixed)
        for i, name in enumerate(names):
            c = coefficients[i if granularity == "layer" else 0].to(task_vectors[name].dtype)
            state[name] = base[name] + torch.tensordot(c, task_vectors[name], dims=1)
        return state

    draws = [_Draws(loader, batches, fresh_pass, device) for loader in loaders]
    history = []
    for _ in range(steps):
        state = merged(raw.clamp(0.0, 1.0))
        loss = sum(entropy(forward(state, task, inputs)).mean() for task, draw in enumerate(draws) for inputs in draw.next())
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


def _task_vectors(name: str, base: Mapping[str, torch.Tensor], finetuned: Sequence[Mapping[str, torch.Tensor]]) -> torch.Tensor:
    stacked = torch.stack([m[name].detach().to(base[name].dtype) for m in finetuned]) - base[name].detach()
    finite = torch.isfinite(stacked.flatten(1)).all(dim=1)
    if not finite.all():
        k = int((~finite).nonzero()[0])
        raise UserError(f"tensor '{name}' of model {k} (or of the base) holds NaN or infinite values")
    return stacked


class _Draws:
    """The inputs one task contributes to each step: ``count`` batches of ``loader``."""

    def __init__(self, loader: Iterable[Any], count: int, fresh_pass: bool, device: torch.device):
        self.loader, self.count, self.fresh_pass, self.device = loader, count, fresh_pass, device
        self._pass: Iterator[Any] | None = None

    def next(self) -> list[Any]:
        """A fresh pass's first ``count`` batches (``fresh_pass``), or the next ``count`` ones."""
        if self.fresh_pass or self._pass is None:
            self._pass = iter(self.loader)
        taken: list[Any] = []
        restarted = self.fresh_pass
        while len(taken) < self.count:
            batch = next(self._pass, _END)
            if batch is _END:
                if restarted:  # a fresh pass ran out: fewer batches than count (the reference's too)
                    break
                self._pass, restarted = iter(self.loader), True
                continue
            inputs = batch[0] if isinstance(batch, tuple | list) else batch
            taken.append(inputs.to(self.device) if isinstance(inputs, torch.Tensor) else inputs)
        if not taken:
            raise UserError("a data loader given to adamerging yields no batches", key="loaders")
        return taken


_END = object()
