"""Shared machinery of test-time adaptation (TTA) methods.

Every gradient-based TTA method of clpeft (Tent, EATA, CoTTA, RMT, Dual Teacher) does the same
things around its own loss, following Wang et al., "Tent: Fully Test-Time Adaptation by
Entropy Minimization", ICLR 2021 (https://arxiv.org/abs/2006.10726), section 3:

* BatchNorm layers normalise with the statistics of the test batch (:func:`use_batch_statistics`),
* only a chosen set of parameters is updated (the norm layers' affine ``gamma``/``beta`` for
  Tent and EATA, every parameter for CoTTA and RMT: :func:`adapted_parameters`),
* the method runs its own optimizer steps inside ``adapt`` (:class:`AdaptationOptimizer`),
  whose state travels in the strategy's ``state_dict`` (resume, reset to source).

:class:`OnlineAdaptation` bundles the three, configured by the options every such method shares
(:class:`~clpeft.components.tta.options.AdaptationOptions`); a strategy calls
:meth:`OnlineAdaptation.prepare` when a test-time experience begins and
:meth:`OnlineAdaptation.begin_batch` in ``adapt``.

BatchNorm is switched with ``track_running_stats = False`` and train mode on the norm layers
only; unlike the reference code the running statistics are kept, so the ``state_dict`` keys
of an adapting model equal those of its source model (a reset is a plain ``load_state_dict``).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from typing import Literal

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from clpeft.components.tta.options import AdaptationOptions
from clpeft.errors import UserError

NORM_TYPES = (_BatchNorm, nn.LayerNorm, nn.GroupNorm)


def classifier(backbone: nn.Module, head: nn.Module) -> nn.Sequential:
    """The network a TTA method adapts, ``head(backbone(x))``, as one module (parameter names
    ``0.*`` for the backbone and ``1.*`` for the head; teachers are copies of it)."""
    return nn.Sequential(backbone, head)


def batch_norm_layers(model: nn.Module) -> list[_BatchNorm]:
    """Every BatchNorm layer of ``model`` (teachers included when they are submodules)."""
    return [m for m in model.modules() if isinstance(m, _BatchNorm)]


def use_batch_statistics(layers: list[_BatchNorm]) -> None:
    """Normalise with the current batch's statistics, without updating the running ones.

    Sets only the norm layers to train mode (dropout elsewhere stays off); cheap enough to
    call before every batch, which undoes an ``eval()`` of the owner in between.
    """
    for m in layers:
        m.track_running_stats = False
        m.training = True


def adapted_parameters(model: nn.Module, which: Literal["norm", "all"]) -> list[nn.Parameter]:
    """Make only the adapted parameters trainable and return them (in ``named_parameters`` order).

    ``norm``: the affine weight and bias of BatchNorm/LayerNorm/GroupNorm layers (Tent);
    ``all``: the weight and bias of every layer (CoTTA, RMT). As in the reference code
    (``collect_params`` of Döbler et al.'s benchmark and of CoTTA), parameters under other names
    stay fixed: a ViT's class token and position embedding, LayerScale's ``gamma``.
    """
    model.requires_grad_(False)
    chosen = []
    for module in model.modules():
        if which == "all" or isinstance(module, NORM_TYPES):
            for name in ("weight", "bias"):
                p = module._parameters.get(name)
                if p is not None:
                    p.requires_grad_(True)
                    chosen.append(p)
    if not chosen:
        raise ValueError(f"the model has no {'normalisation layer with affine ' if which == 'norm' else ''}parameters to adapt")
    ids = {id(p) for p in chosen}
    return [p for p in model.parameters() if id(p) in ids]


def check_adaptable(backbone: nn.Module, params: str, strategy: str) -> None:
    """Refuse, at construction, a backbone that the method cannot adapt (a user error)."""
    if params == "norm" and not any(isinstance(m, NORM_TYPES) and getattr(m, "weight", None) is not None for m in backbone.modules()):
        raise UserError(
            f"strategy '{strategy}' adapts normalisation layers, and this backbone has none with affine "
            f"parameters; use a backbone with BatchNorm/LayerNorm (e.g. name: cnn, or a timm model)",
            key="backbone.name",
        )


class AdaptationOptimizer(nn.Module):
    """The optimizer a TTA method steps inside ``adapt``; its state is part of ``state_dict``.

    Args:
        optimizer: ``adam`` (every method on CIFAR) or ``sgd`` (ImageNet); SGD uses Nesterov
            momentum without dampening, as Döbler et al.'s benchmark and Tent's code do.
        lr: learning rate.
        momentum: SGD momentum, or Adam's ``beta1`` (``beta2`` is 0.999).
        weight_decay: L2 penalty.

    :meth:`bind` creates the torch optimizer over the adapted parameters (once); a state loaded
    before that is applied then. Loading a state saved before the first :meth:`bind` (the
    source model's) clears the moment estimates, as Tent's ``reset`` does.
    """

    def __init__(self, optimizer: Literal["adam", "sgd"] = "adam", lr: float = 1e-3, momentum: float = 0.9, weight_decay: float = 0.0):
        super().__init__()
        self.kind = optimizer
        self.lr = lr
        self.momentum = momentum
        self.weight_decay = weight_decay
        self._optimizer: torch.optim.Optimizer | None = None
        self._pending: dict | None = None

    @property
    def bound(self) -> bool:
        return self._optimizer is not None

    def bind(self, params: list[nn.Parameter]) -> None:
        """Create the optimizer over ``params`` unless it already holds exactly these."""
        if self._optimizer is not None and [id(p) for p in self._optimizer.param_groups[0]["params"]] == [id(p) for p in params]:
            return
        if self.kind == "sgd":
            self._optimizer = torch.optim.SGD(
                params, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay, nesterov=self.momentum > 0
            )
        else:
            self._optimizer = torch.optim.Adam(params, lr=self.lr, betas=(self.momentum, 0.999), weight_decay=self.weight_decay)
        if self._pending is not None:
            self._optimizer.load_state_dict(self._pending)
            self._pending = None

    def scale_lr(self, factor: float) -> None:
        """Set the learning rate to ``factor * lr`` (a warm-up ramp; 1 restores it)."""
        for group in self._optimizer.param_groups:
            group["lr"] = self.lr * factor

    def step(self, loss: torch.Tensor) -> None:
        """``backward`` of ``loss`` and one optimizer step (gradients cleared first)."""
        self._optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self._optimizer.step()

    def get_extra_state(self) -> dict:
        state = self._optimizer.state_dict() if self._optimizer is not None else self._pending
        return {"optimizer": copy.deepcopy(state)}

    def set_extra_state(self, state: dict) -> None:
        saved = state.get("optimizer")
        if saved is None:
            self._pending = None
            if self._optimizer is not None:
                self._optimizer.state.clear()
        elif self._optimizer is not None:
            self._optimizer.load_state_dict(copy.deepcopy(saved))
        else:
            self._pending = copy.deepcopy(saved)


class OnlineAdaptation(nn.Module):
    """The per-strategy TTA setup: which parameters adapt, batch statistics, the optimizer.

    Args:
        options: the optimizer and the adapted parameters (:class:`AdaptationOptions`); ``None``
            updates no parameter (test-batch statistics alone, or LAME's output adjustment).
        batch_statistics: BatchNorm layers use test-batch statistics (``False``: source ones).

    ``started`` (a buffer, so it is saved and restored with the strategy) records whether
    adaptation has begun: a strategy initialises its teachers from the source model the
    first time, and a restored source state starts over.
    """

    def __init__(self, options: AdaptationOptions | None, batch_statistics: bool = True):
        super().__init__()
        self.params = options.params if options is not None else "none"
        self.batch_statistics = batch_statistics
        # never stepped without options, but its (empty) state keeps every TTA checkpoint's keys alike
        o = options or AdaptationOptions()
        self.optimizer = AdaptationOptimizer(o.optimizer, o.lr, o.momentum, o.weight_decay)
        self.register_buffer("started", torch.zeros((), dtype=torch.bool))
        self._norms: list[_BatchNorm] = []

    def prepare(
        self, owner: nn.Module, model: nn.Module, on_start: Callable[[], None] | None = None, extra: Iterable[nn.Parameter] = ()
    ) -> None:
        """Configure ``model`` (owned by ``owner``, all of whose BatchNorm layers switch) for
        adaptation; ``extra`` parameters outside ``model`` (RMT's projection head) are optimised
        too. The first time (``model`` is still the source model) ``on_start`` runs after the
        configuration: teachers copy the source model there, EATA weighs its parameters."""
        if self.params != "none":
            self.optimizer.bind(adapted_parameters(model, self.params) + list(extra))
        else:
            model.requires_grad_(False)
        owner.eval()
        use_batch_statistics(batch_norm_layers(owner) if self.batch_statistics else [])
        if not bool(self.started):
            if on_start is not None:
                on_start()
            self.started.fill_(True)
        owner.eval()  # copies made by on_start are new modules: configure them too
        self._norms = batch_norm_layers(owner) if self.batch_statistics else []
        use_batch_statistics(self._norms)

    def begin_batch(self, owner: nn.Module) -> None:
        """Re-assert the adaptation modes (the engine may have switched the owner's mode)."""
        if owner.training:
            owner.eval()
        use_batch_statistics(self._norms)

    def step(self, loss: torch.Tensor) -> None:
        """One optimizer step on ``loss``."""
        self.optimizer.step(loss)
