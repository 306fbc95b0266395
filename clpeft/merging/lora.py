"""LoRA adapters as low-rank task vectors.

LoRA (Hu et al., ICLR 2022, https://arxiv.org/abs/2106.09685) fine-tunes a weight ``W`` of
shape ``(out, in)`` as ``W + s * B A`` with ``A: (r, in)``, ``B: (out, r)`` and scaling
``s = alpha / r`` (``alpha / sqrt(r)`` with rsLoRA). ``s * B A`` is the adapter's task vector
for that weight, so adapters merge from their factors:

* a linear method (task arithmetic, mean) needs only ``sum_k c_k s_k B_k A_k``, which is one
  product of the concatenated factors, ``[c_1 s_1 B_1, ..., c_K s_K B_K] @ [A_1; ...; A_K]``:
  one dense ``(out, in)`` delta per layer, never one per adapter;
* TIES and DARE act on dense entries, so each adapter's delta is formed for one layer at a
  time, right before that layer is merged.

Two on-disk formats are read:

* peft: ``adapter_model.safetensors`` with ``base_model.model.<module>.lora_A.weight`` and
  ``...lora_B.weight``, and ``adapter_config.json`` with ``r``, ``lora_alpha`` and optionally
  ``use_rslora``, ``rank_pattern``, ``alpha_pattern``. DoRA and ``fan_in_fan_out`` adapters
  are rejected (DoRA's magnitude vector makes the delta non-linear in the factors), and so are
  other peft types such as VeRA (its shared projections are sliced by the base layers' shapes,
  which an adapter alone does not give).
* clpeft: ``<module>.lora_A`` and ``<module>.lora_B``; ``alpha`` from a scalar tensor
  ``<module>.lora_alpha``, else the ``alpha`` argument, else the file's ``lora_alpha``
  metadata; ``r`` is the number of rows of ``A``. Every adapter kind of
  :mod:`clpeft.components.lora` is saved this way (VeRA and LoRA-XS updates as their equivalent
  LoRA factors, PiSSA updates with their start), so they merge as LoRA; DoRA files, which add a
  ``<module>.lora_magnitude_vector``, are rejected as peft's are.

Either way the adapted base tensor is ``<module>.weight``. Convolutions follow peft:
``A: (r, in, kh, kw)``, ``B: (out, r, 1, 1)``, delta ``(out, in, kh, kw)``.
"""

from __future__ import annotations

import json
import math
import re
import reprlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from clpeft.errors import UserError
from clpeft.merging.io import SafetensorsSource, StateDictSource, TensorSource, open_checkpoint

__all__ = ["LoraAdapter", "LoraLayer", "is_lora", "merge_factors", "open_model"]

_PEFT_PREFIX = "base_model.model."
_FACTOR_SUFFIXES = (
    (".lora_A.weight", "A"),
    (".lora_B.weight", "B"),
    (".lora_A", "A"),
    (".lora_B", "B"),
)
_ALPHA_SUFFIX = ".lora_alpha"
_MAGNITUDE_SUFFIX = ".lora_magnitude_vector"


@dataclass(frozen=True)
class LoraLayer:
    """Where one adapted weight's factors are stored, and its scaling ``s``."""

    a_key: str
    b_key: str
    scaling: float


def _strip(key: str) -> str:
    return key[len(_PEFT_PREFIX) :] if key.startswith(_PEFT_PREFIX) else key


def _parse_factor(key: str) -> tuple[str, str] | None:
    """``(module, "A" | "B")`` for a LoRA factor key, else None."""
    for suffix, factor in _FACTOR_SUFFIXES:
        if key.endswith(suffix):
            return _strip(key[: -len(suffix)]), factor
    return None


def is_lora(source: TensorSource) -> bool:
    """Whether a checkpoint holds LoRA factors."""
    return any(_parse_factor(k) is not None for k in source.keys())


class LoraAdapter:
    """A LoRA adapter: per adapted base tensor, the keys of its factors and its scaling.

    Build one with :meth:`from_state_dict` (in memory), :meth:`from_source` or
    :func:`open_adapter` (on disk); factors are read when a layer is merged.

    Attributes:
        source: where the factors are read from.
        layers: adapted base tensor name (``<module>.weight``) -> :class:`LoraLayer`.
        other: base tensor name -> key of a tensor in the adapter that is not a LoRA factor
            (e.g. peft's ``modules_to_save``); merging requires a rule for each.
    """

    def __init__(self, source: TensorSource, layers: Mapping[str, LoraLayer], other: Mapping[str, str] | None = None):
        self.source = source
        self.layers = dict(layers)
        self.other = dict(other or {})
        self.description = source.description

    @classmethod
    def from_source(cls, source: TensorSource, *, config: Mapping[str, Any] | None = None, alpha: float | None = None) -> LoraAdapter:
        """Parse an adapter's tensors.

        Args:
            source: the adapter's tensors.
            config: peft's ``adapter_config.json`` contents; None for clpeft's format.
            alpha: ``alpha`` for clpeft adapters without per-module ``lora_alpha`` tensors.
        """
        if config is not None and config.get("peft_type", "LORA") != "LORA":
            raise UserError(
                f"{source.description} is a peft {reprlib.repr(config['peft_type'])} adapter; merging reads LoRA "
                "adapters (clpeft's save_adapters stores VeRA layers as LoRA factors)"
            )
        factors: dict[str, dict[str, str]] = {}
        alphas: dict[str, str] = {}
        other: dict[str, str] = {}
        for key in source.keys():
            if key.endswith((_MAGNITUDE_SUFFIX, _MAGNITUDE_SUFFIX + ".weight")):
                raise UserError(f"{source.description} is a DoRA adapter; its magnitude vector cannot be merged as a task vector")
            parsed = _parse_factor(key)
            if parsed is not None:
                factors.setdefault(parsed[0], {})[parsed[1]] = key
            elif key.endswith(_ALPHA_SUFFIX):
                alphas[_strip(key[: -len(_ALPHA_SUFFIX)])] = key
            else:
                other[_strip(key)] = key
        layers = {}
        for module, keys in factors.items():
            if set(keys) != {"A", "B"}:
                missing = ({"A", "B"} - set(keys)).pop()
                raise UserError(f"{source.description}: LoRA layer '{module}' has no lora_{missing} factor")
            a_shape, b_shape = source.info(keys["A"]).shape, source.info(keys["B"]).shape
            rank = a_shape[0] if a_shape else 0
            if rank == 0 or len(b_shape) < 2 or b_shape[1] != rank or math.prod(b_shape) != b_shape[0] * rank:
                raise UserError(
                    f"{source.description}: LoRA factors of '{module}' do not fit: lora_A {list(a_shape)}, "
                    f"lora_B {list(b_shape)} (expected lora_B of shape [out, {rank}])"
                )
            if config is not None:
                scaling = _peft_scaling(config, module, rank, source.description)
            else:
                scaling = _clpeft_alpha(source, module, alphas.get(module), alpha) / rank
            layers[f"{module}.weight"] = LoraLayer(keys["A"], keys["B"], scaling)
        return cls(source, layers, other)

    @classmethod
    def from_state_dict(
        cls,
        tensors: Mapping[str, torch.Tensor],
        *,
        config: Mapping[str, Any] | None = None,
        alpha: float | None = None,
        description: str = "LoRA adapter",
    ) -> LoraAdapter:
        """An adapter from an in-memory state dict (see :meth:`from_source`)."""
        return cls.from_source(StateDictSource(tensors, description), config=config, alpha=alpha)

    def delta_shape(self, name: str) -> tuple[int, ...]:
        """Shape of the dense delta ``s B A`` for base tensor ``name``."""
        layer = self.layers[name]
        a_shape, b_shape = self.source.info(layer.a_key).shape, self.source.info(layer.b_key).shape
        return (b_shape[0], *a_shape[1:])

    def factors(self, name: str, *, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, float]:
        """``(B as (out, r), A as (r, N/out), s)`` for base tensor ``name``."""
        layer = self.layers[name]
        a = self.source.read(layer.a_key).to(device=device, dtype=dtype)
        b = self.source.read(layer.b_key).to(device=device, dtype=dtype)
        return b.reshape(b.shape[0], -1), a.reshape(a.shape[0], -1), layer.scaling

    def delta(self, name: str, *, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """The dense task vector ``s B A`` of base tensor ``name``, flattened."""
        b, a, scaling = self.factors(name, device=device, dtype=dtype)
        return (b @ a).mul_(scaling).reshape(-1)


def merge_factors(
    adapters: Sequence[LoraAdapter],
    name: str,
    coefficients: Sequence[float],
    *,
    device: torch.device,
    dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``sum_k c_k s_k B_k A_k`` for one base tensor, from the factors, and each ``||s_k B_k A_k||_F``.

    The sum is a single product of the concatenated factors, so only the merged ``(out, in)``
    delta is ever dense. The norms use ``||B A||_F^2 = sum((B^T B) * (A A^T))`` (r x r work).

    Returns:
        The flattened merged delta and a ``(K,)`` tensor of task-vector norms (0 where an
        adapter does not adapt this tensor).
    """
    left, right, norms = [], [], []
    for adapter, c in zip(adapters, coefficients, strict=True):
        if name not in adapter.layers:
            norms.append(torch.zeros((), device=device, dtype=dtype))
            continue
        b, a, scaling = adapter.factors(name, device=device, dtype=dtype)
        norms.append(((b.T @ b) * (a @ a.T)).sum().clamp_(min=0).sqrt_().mul_(abs(scaling)))
        left.append(b * (c * scaling))
        right.append(a)
    return (torch.cat(left, dim=1) @ torch.cat(right, dim=0)).reshape(-1), torch.stack(norms)


def _clpeft_alpha(source: TensorSource, module: str, alpha_key: str | None, alpha: float | None) -> float:
    if alpha_key is not None:
        return float(source.read(alpha_key).item())
    if alpha is not None:
        return float(alpha)
    if "lora_alpha" in source.metadata():
        return float(source.metadata()["lora_alpha"])
    raise UserError(
        f"{source.description}: LoRA layer '{module}' has no alpha; store a '{module}.lora_alpha' tensor or "
        "'lora_alpha' metadata, give peft's adapter_config.json, or pass alpha="
    )


def _pattern_value(patterns: Mapping[str, Any], module: str, default: Any) -> Any:
    """peft's ``rank_pattern``/``alpha_pattern``: the first pattern matching the end of the module name."""
    for pattern, value in patterns.items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            return value
    return default


def _peft_scaling(config: Mapping[str, Any], module: str, rank: int, description: str) -> float:
    if config.get("use_dora"):
        raise UserError(f"{description} is a DoRA adapter; its magnitude vector cannot be merged as a task vector")
    if config.get("fan_in_fan_out"):
        raise UserError(f"{description} uses fan_in_fan_out (Conv1D layers), which merging does not support")
    try:
        r = _pattern_value(config.get("rank_pattern") or {}, module, config["r"])
        alpha = _pattern_value(config.get("alpha_pattern") or {}, module, config["lora_alpha"])
    except KeyError as exc:
        raise UserError(f"{description}: adapter_config.json lacks {exc}") from None
    except (AttributeError, re.error) as exc:  # a pattern table that is not an object, or not a regex
        raise UserError(f"{description}: adapter_config.json has an unusable rank_pattern/alpha_pattern ({exc})") from None
    if r != rank:
        raise UserError(f"{description}: lora_A of '{module}' has rank {rank} but adapter_config.json says r={reprlib.repr(r)}")
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not math.isfinite(alpha):
        raise UserError(f"{description}: adapter_config.json gives '{module}' lora_alpha={reprlib.repr(alpha)}, not a finite number")
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


def open_model(path: str | Path) -> SafetensorsSource | LoraAdapter:
    """Open a fine-tuned checkpoint on disk: a LoRA adapter if it is one, else a full checkpoint.

    A directory with ``adapter_config.json`` is a peft adapter; a checkpoint whose tensors
    include LoRA factors is a clpeft adapter (see the module docstring); anything else is read
    as a full checkpoint (see :func:`~clpeft.merging.io.checkpoint_files`).
    """
    path = Path(path)
    config_file = path / "adapter_config.json"
    config = None
    if config_file.is_file():
        try:
            config = json.loads(config_file.read_text())
        except (ValueError, RecursionError) as exc:
            raise UserError(f"{config_file} is not valid JSON ({exc})") from None
        if not isinstance(config, dict):
            raise UserError(f"{config_file} must hold a JSON object (peft's LoraConfig)")
    source = open_checkpoint(path)
    if config is None and not is_lora(source):
        return source
    try:
        return LoraAdapter.from_source(source, config=config)
    except BaseException:
        source.close()
        raise
