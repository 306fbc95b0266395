"""Adapter kinds of the LoRA family by name, and which dynamic-rank operations each one allows.

``lora`` (:class:`~clpeft.components.lora.LoRALinear`), ``dora``
(:class:`~clpeft.components.lora.dora.DoRALinear`), ``pissa`` (LoRA whose updates start at the
weight's principal components, :mod:`~clpeft.components.lora.pissa`), ``vera``
(:class:`~clpeft.components.lora.vera.VeRALinear`), ``lora_xs``
(:class:`~clpeft.components.lora.lora_xs.LoRAXSLinear`) and ``adalora`` (SVD-form updates,
:class:`~clpeft.components.lora.adalora.AdaLoRALinear`; its budget schedule is
:class:`~clpeft.components.lora.adalora.AdaLoRAAllocator`). EVA's data-driven start of ``lora``
and ``dora`` updates is :func:`~clpeft.components.lora.eva.eva_init`. All are ``LoRALinear`` layers, so
everything that takes LoRA layers (frozen and merged updates, adapter files, merging, EMA
copies) takes them; :func:`check_adapter` refuses, in one line, what a kind does not define.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Literal, get_args

from torch import nn

from clpeft.components.lora.adalora import AdaLoRALinear
from clpeft.components.lora.dora import DoRALinear
from clpeft.components.lora.layer import LoRALinear
from clpeft.components.lora.lora_xs import LoRAXSLinear
from clpeft.components.lora.vera import VeRALinear, shared_projections
from clpeft.errors import UserError

__all__ = ["ADAPTER_KINDS", "AdapterKind", "adapter_layers", "check_adapter"]

AdapterKind = Literal["lora", "dora", "pissa", "vera", "lora_xs", "adalora"]
ADAPTER_KINDS: tuple[str, ...] = get_args(AdapterKind)

# what each operation needs, and the kinds that lack it (with the reason)
_UNDEFINED = {
    "grow": {"vera": "every layer uses the rank of the shared projections"},
    "prune": {
        "pissa": "a PiSSA update starts at the weight's principal components, not at zero",
        "vera": "every layer uses the rank of the shared projections",
        "lora_xs": "its r x r matrix R mixes the components",
    },
    "design_a": {
        "pissa": "PiSSA sets A to the weight's principal components",
        "vera": "A is VeRA's shared random projection",
        "lora_xs": "A comes from the weight's SVD",
        "adalora": "A is the trained right factor of its SVD form",
    },
    "learnable_scale": {
        "vera": "the scaling vectors already scale the update",
        "lora_xs": "R already scales the update",
        "adalora": "its singular values already scale the update",
    },
    "layer_ranks": {"vera": "every layer uses the rank of the shared projections"},
    "freeze": {"dora": "its magnitude rescales the whole weight; use old_updates: merge"},
    "low_rank": {"dora": "its magnitude rescales whole weight rows, so its update is not low-rank"},
}
_WHAT = {
    "grow": "rank growth",
    "prune": "rank pruning",
    "design_a": "a designed A (InfLoRA/GPM subspaces)",
    "learnable_scale": "learnable_scale",
    "layer_ranks": "a rank per layer",
    "freeze": "freezing an update beside the base weight",
    "low_rank": "a low-rank task vector",
}


def check_adapter(kind: str, *, key: str | None = None, **uses: bool) -> None:
    """Raise a one-line :class:`UserError` if ``kind`` is unknown or lacks an operation in ``uses``.

    ``uses`` flags, e.g. ``check_adapter("vera", grow=True)``: ``grow``, ``prune``, ``design_a``
    (an ``A`` set by the caller), ``learnable_scale``, ``layer_ranks`` (ranks differing between
    layers), ``freeze`` (``new_update(old="freeze")``), ``low_rank`` (the update read as LoRA
    factors, e.g. for merging).
    """
    if kind not in ADAPTER_KINDS:
        raise UserError(f"unknown adapter kind {kind!r}; use one of {', '.join(ADAPTER_KINDS)}", key=key)
    for use, wanted in uses.items():
        reason = _UNDEFINED[use].get(kind)
        if wanted and reason:
            raise UserError(f"{_WHAT[use]} is not defined for {kind} adapters: {reason}", key=key)


def adapter_layers(
    kind: str,
    bases: Mapping[str, nn.Linear],
    ranks: Sequence[int],
    alpha: float,
    *,
    dropout: float = 0.0,
    learnable_scale: bool = False,
    init: str = "default",
    projection_seed: int = 0,
    key: str | None = None,
) -> dict[str, LoRALinear]:
    """One adapter layer of ``kind`` per base layer (not yet put into the model).

    Args:
        kind: one of :data:`ADAPTER_KINDS`.
        bases: the linears to adapt, by module path.
        ranks: one rank per base layer (``vera``: all equal).
        alpha: LoRA ``alpha`` (no role in ``vera``).
        dropout: dropout on the update's input.
        learnable_scale: a trained scalar on the update (``lora``, ``dora``, ``pissa``).
        init: ``default`` or ``pissa`` for ``lora`` and ``dora`` (``pissa`` is ``lora`` with ``init="pissa"``).
        projection_seed: VeRA's ``projection_prng_key``.
    """
    check_adapter(kind, key=key, learnable_scale=learnable_scale, layer_ranks=len(set(ranks)) > 1)
    if init != "default" and kind not in ("lora", "dora"):
        raise UserError(f"init {init!r} applies to lora and dora adapters, not {kind}", key=key)
    if kind == "vera":
        projections = shared_projections([(m.out_features, m.in_features) for m in bases.values()], ranks[0], projection_seed)
        return {name: VeRALinear(base, projections, dropout=dropout) for name, base in bases.items()}
    layers = {}
    for (name, base), rank in zip(bases.items(), ranks, strict=True):
        if kind == "lora_xs":
            layers[name] = LoRAXSLinear(base, rank, alpha, dropout)
        elif kind == "adalora":
            layers[name] = AdaLoRALinear(base, rank, alpha, dropout)
        else:
            cls = DoRALinear if kind == "dora" else LoRALinear
            layers[name] = cls(base, rank, alpha, dropout, learnable_scale, "pissa" if kind == "pissa" else init)
    return layers
