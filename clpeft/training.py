"""One optimizer step and what surrounds it: optimizer, schedule, backward, DDP, replaced parameters.

:class:`clpeft.run.Run` trains an experience with these; ``clpeft bench`` times the same code.
The optimizer and its schedule are rebuilt at every experience (the usual continual-learning
protocol), so a checkpoint needs only the strategy's state.
"""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable
from contextlib import contextmanager

import torch
from torch import nn

from clpeft import distributed, fsdp
from clpeft.errors import RunError
from clpeft.resizing import replace_parameters
from clpeft.strategy import Strategy

__all__ = ["FEW_STEPS", "carry_over", "make_optimizer", "make_scheduler", "optimizer_step", "out_of_memory_hint", "training_step_fn"]

_DDP_ARGS = inspect.signature(nn.parallel.DistributedDataParallel).parameters  # init_sync: torch >= 2.4
# Fewer optimizer steps than this in an experience that trains draw a one-line warning.
FEW_STEPS = 10


def _ddp_options() -> dict:
    """No state broadcast at construction or per forward: the ranks hold identical states
    (checked after every experience) and buffers are combined after training."""
    options = {"init_sync": False} if "init_sync" in _DDP_ARGS else {}
    options["forward_sync_buffers" if "forward_sync_buffers" in _DDP_ARGS else "broadcast_buffers"] = False
    return options


def make_optimizer(groups: list[dict], train) -> torch.optim.Optimizer | None:
    groups = [g for g in groups if g["params"]]
    if not groups:
        return None
    if train.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=train.lr, momentum=train.momentum, weight_decay=train.weight_decay, nesterov=train.nesterov)
    cls = torch.optim.Adam if train.optimizer == "adam" else torch.optim.AdamW
    return cls(groups, lr=train.lr, weight_decay=train.weight_decay)


def make_scheduler(optimizer: torch.optim.Optimizer, train, steps_per_epoch: int):
    """One experience's learning-rate schedule, stepped after every optimizer step (None: constant).

    ``cosine``: ``lr_t = lr/2 (1 + cos(pi t / T))`` over the experience's ``T`` steps (Loshchilov &
    Hutter, ICLR 2017); ``quarter_cosine``: ``lr * cos(99 pi max(e - 1, 0) / (200 (E - 1)))`` for every
    step of epoch ``e`` of ``E``, exactly what the ``CosineSchedule`` of CODA-Prompt's and InfLoRA's
    code gives per epoch (it resets its counter after construction, so epochs 0 and 1 both run at
    ``lr``; constant when ``E = 1``); ``cosine_epoch``: ``min_lr + (lr - min_lr) (1 + cos(pi e / E)) / 2``
    for every step of epoch ``e`` (``CosineAnnealingLR(T_max=E, eta_min=min_lr)`` stepped once per
    epoch, as LAMDA-PILOT's trainers); ``multistep``: ``lr * gamma^m``
    from the first step of each milestone epoch on, ``m`` the milestones passed (SLCA's x0.1 at
    epoch 18 of 20).
    """
    if train.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=train.epochs * steps_per_epoch)
    if train.schedule == "cosine_epoch":
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer,
            [
                functools.partial(_cosine_epoch, base=group["lr"], floor=train.min_lr, epochs=train.epochs, steps_per_epoch=steps_per_epoch)
                for group in optimizer.param_groups
            ],
        )
    if train.schedule == "quarter_cosine":
        last = max(train.epochs - 1, 1)
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda t: math.cos(99 * math.pi * max(t // steps_per_epoch - 1, 0) / (200 * last))
        )
    if train.schedule == "multistep":
        return torch.optim.lr_scheduler.MultiStepLR(
            optimizer, milestones=[m * steps_per_epoch for m in train.milestones], gamma=train.gamma
        )
    return None


def _cosine_epoch(t: int, base: float, floor: float, epochs: int, steps_per_epoch: int) -> float:
    """The factor on ``base`` at step ``t`` of the ``cosine_epoch`` schedule (see :func:`make_scheduler`)."""
    lr = floor + (base - floor) * (1 + math.cos(math.pi * (t // steps_per_epoch) / epochs)) / 2
    return lr / base


def optimizer_step(
    optimizer: torch.optim.Optimizer, loss: torch.Tensor, clip_grad: float | None, after_backward: Callable[[], None] | None = None
) -> None:
    """Backward, ``after_backward`` (the strategy's hook: gradients in place), optional gradient-norm
    clipping, one optimizer step."""
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if after_backward is not None:
        after_backward()
    if clip_grad is not None:
        torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], clip_grad)
    optimizer.step()


@contextmanager
def out_of_memory_hint(doing: str, key: str, batch_size: int):
    """Turn CUDA out-of-memory into a RunError that names the batch size to lower."""
    try:
        yield
    except torch.cuda.OutOfMemoryError:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        raise RunError(
            f"CUDA out of memory while {doing} with {key}={batch_size}; lower {key} (e.g. --set {key}={max(1, batch_size // 2)}) "
            f"or use a smaller model or image size (checkpoints of completed experiences are kept)"
        ) from None


class _StepModule(nn.Module):
    """The strategy's ``training_step`` as a module's forward: what DistributedDataParallel wraps."""

    def __init__(self, strategy: Strategy):
        super().__init__()
        self.strategy = strategy

    def forward(self, batch, weight: float) -> torch.Tensor:
        if len(batch.y) == 0:  # an empty share of the last global batch: zero gradients to the all-reduce
            return sum(p.sum() for p in self.strategy.parameters() if p.requires_grad) * 0.0
        return self.strategy.training_step(batch) * weight


def training_step_fn(strategy: Strategy, world: distributed.World):
    """``step(batch, n_global) -> (loss to backpropagate, mean loss over the global batch, n_global)``.

    In one process this is ``training_step``. With several ranks the strategy runs under
    DistributedDataParallel (rebuilt per experience, since methods change what trains), the
    local loss is weighted by ``n_local * world / n_global`` so that DDP's gradient average is
    the global batch mean, and the reported loss is all-reduced.
    """
    if not world.active:

        def step(batch, n_global):
            loss = strategy.training_step(batch)
            return loss, loss.item(), len(batch.y)  # one device sync per step: the NaN check and the log

        return step
    # a strategy may train a different subset of its parameters at each step (the selected
    # prompts; LAE's frozen first epochs), hence the search for unused parameters
    ddp = fsdp.sharded_step(strategy) or nn.parallel.DistributedDataParallel(
        _StepModule(strategy), find_unused_parameters=True, **_ddp_options()
    )

    def step(batch, n_global):
        n_local = len(batch.y)
        loss = ddp(batch, n_local * world.size / n_global)
        weighted = loss.detach().double() * n_global / world.size  # = local mean loss * n_local
        totals = world.all_reduce_sum(torch.stack([weighted.cpu(), torch.tensor(float(n_local), dtype=torch.float64)]))
        return loss, float(totals[0] / totals[1]), n_global

    return step


def carry_over(strategy: Strategy, optimizer: torch.optim.Optimizer, named: dict[str, nn.Parameter], world: distributed.World):
    """After ``after_training_step`` replaced parameters: hand them to ``optimizer`` with their
    predecessors' state and rebuild the step function (DDP's buckets follow the new parameters).

    Returns:
        (the named parameters now, the new step function).
    """
    current = dict(strategy.named_parameters())
    replace_parameters(optimizer, named, current)
    return current, training_step_fn(strategy, world)
