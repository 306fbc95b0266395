"""Putting LoRA layers into a model: finding target linears by name, per-layer rank schedules
(PRILoRA's depth-linear ranks), and replacing modules in place.

:func:`find_linear_targets` and :func:`replace_module` are the generic target finding that the
parallel adapters (:mod:`~clpeft.components.lora.parallel_adapter`) and the batched multi-adapter
layers (:mod:`~clpeft.components.lora.batched`) share.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch import nn

from clpeft.components.lora.kinds import adapter_layers
from clpeft.components.lora.layer import LoRALinear
from clpeft.errors import UserError


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """Every :class:`LoRALinear` in ``model``, by module path, in module order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def layer_depths(names: Sequence[str]) -> list[int]:
    """Depth of each layer: the block index in its path, else its position in ``names``.

    The block index is the first integer component of the module path (``blocks.3.attn.qkv``
    -> 3, ``encoder.layer.5.attention.self.query`` -> 5, ``model.layers.2.self_attn.q_proj``
    -> 2), so all layers of one block share a depth. When some name has no integer component
    the position in ``names`` (module order) is used for every layer instead.
    """
    indices = [next((int(part) for part in name.split(".") if part.isdigit()), None) for name in names]
    return list(range(len(names))) if None in indices else indices


def layer_ranks(
    names: Sequence[str],
    rank: int,
    schedule: str | Sequence[int] = "constant",
    max_rank: int | None = None,
) -> list[int]:
    """Per-layer ranks for the layers ``names`` (in module order).

    Args:
        names: module paths of the adapted layers.
        rank: the rank (``constant``) or the rank of the shallowest layers (``linear``).
        schedule: ``"constant"``; ``"linear"``, PRILoRA's ranks increasing linearly with
            :func:`layer_depths` from ``rank`` (shallowest) to ``max_rank`` (deepest), rounded
            half up; or an explicit list with one rank per layer.
        max_rank: the rank of the deepest layers for ``"linear"``.
    """
    if not isinstance(schedule, str):
        ranks = [int(r) for r in schedule]
        if len(ranks) != len(names):
            raise UserError(f"rank_schedule lists {len(ranks)} ranks for {len(names)} adapted layers")
        return ranks
    if schedule == "constant":
        return [rank] * len(names)
    if schedule != "linear":
        raise UserError(f"unknown rank_schedule {schedule!r}; use 'constant', 'linear' or a list of ranks")
    if max_rank is None:
        raise UserError("rank_schedule 'linear' needs max_rank (the rank of the deepest layer)")
    depths = layer_depths(names)
    low, high = min(depths, default=0), max(depths, default=0)
    span = max(high - low, 1)
    return [math.floor(rank + (max_rank - rank) * (d - low) / span + 0.5) for d in depths]


def _matches(name: str, targets: Sequence[str]) -> bool:
    return any(name == t or name.endswith("." + t) for t in targets)


def find_linear_targets(model: nn.Module, targets: Sequence[str], *, key: str | None = None) -> list[str]:
    """Paths of the ``nn.Linear`` layers of ``model`` whose path ends with one of ``targets``.

    Targets are module-name suffixes: ``qkv``, ``proj``, ``fc1``, ``fc2`` for timm ViTs;
    ``query``, ``value`` (BERT-like) or ``q_proj``, ``v_proj`` (LLaMA-like) for transformers;
    a dotted suffix such as ``attn.proj`` or ``blocks.0.attn.qkv`` narrows a match.

    Raises:
        UserError: (with ``key``, e.g. ``"strategy.targets"``) when a target matches no layer
            (a typo would otherwise leave a layer silently unadapted); the message lists the
            model's linear layers.
    """
    linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    unmatched = [t for t in targets if not any(_matches(name, [t]) for name in linears)]
    if unmatched or not targets:
        shown = ", ".join(linears[:8]) + (", ..." if len(linears) > 8 else "")
        raise UserError(
            f"no nn.Linear layer of {type(model).__name__} ends with {unmatched or list(targets)}; "
            f"its linear layers are: {shown or 'none'}",
            key=key,
        )
    return [name for name in linears if _matches(name, targets)]


def replace_module(model: nn.Module, path: str, module: nn.Module) -> None:
    """Put ``module`` at ``path`` inside ``model`` (in place)."""
    parent, _, child = path.rpartition(".")
    setattr(model.get_submodule(parent), child, module)


def inject_lora(
    model: nn.Module,
    targets: Sequence[str],
    rank: int,
    alpha: float,
    *,
    rank_schedule: str | Sequence[int] = "constant",
    max_rank: int | None = None,
    dropout: float = 0.0,
    learnable_scale: bool = False,
    kind: str = "lora",
    init: str = "default",
    projection_seed: int = 0,
    key: str | None = None,
) -> dict[str, LoRALinear]:
    """Wrap the ``nn.Linear`` layers whose path ends with a target in :class:`LoRALinear` (or another adapter kind).

    Targets are matched by :func:`find_linear_targets`. Afterwards only parameters whose
    name starts with ``lora_`` are trainable; unfreeze a head yourself.

    Args:
        model: modified in place.
        targets: name suffixes of the layers to adapt.
        rank, max_rank, rank_schedule: per-layer ranks, see :func:`layer_ranks`.
        alpha: ``alpha`` of every layer (so the scaling ``alpha / r`` differs between layers
            of different rank, as with peft's ``rank_pattern``).
        dropout: dropout on the LoRA input.
        learnable_scale: give every layer a trained scalar ``lora_scale`` (LAE).
        kind: the adapter kind, one of :data:`~clpeft.components.lora.kinds.ADAPTER_KINDS`
            (``lora``, ``dora``, ``pissa``, ``vera``, ``lora_xs``, ``adalora``).
        init: ``default`` or ``pissa`` (PiSSA's start for ``lora`` and ``dora`` layers).
        projection_seed: seed of VeRA's shared projections (peft's ``projection_prng_key``).
        key: the config key named by errors (e.g. ``"strategy.targets"``).

    Returns:
        The new layers by module path, in module order.
    """
    names = find_linear_targets(model, targets, key=key)
    ranks = layer_ranks(names, rank, rank_schedule, max_rank)
    layers = adapter_layers(
        kind,
        {name: model.get_submodule(name) for name in names},
        ranks,
        alpha,
        dropout=dropout,
        learnable_scale=learnable_scale,
        init=init,
        projection_seed=projection_seed,
        key=key,
    )
    for name, layer in layers.items():
        replace_module(model, name, layer)
    for name, param in model.named_parameters():
        param.requires_grad_(name.rpartition(".")[2].startswith("lora_"))
    return layers
