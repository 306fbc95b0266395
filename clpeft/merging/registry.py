"""Merge-method registry: a typed function becomes a named, documented method.

As in mergekit's ``@merge_method`` (``mergekit/merge_methods/easy_define.py``), a method is a
plain function; the decorator records its name and paper, and builds the parameter schema
from its keyword-only arguments with :mod:`clpeft.schema` (the builder of the run config's
sections too), so a misspelled or ill-typed parameter is an error that names it instead of
being silently ignored. Float parameters must be finite: NaN or infinity as a coefficient
turns every merged tensor into NaN.

Two scopes exist:

* ``"tensor"`` methods map the stacked task vectors of one tensor to the merged task vector:
  ``fn(task_vectors: Tensor[K, N], *, **params) -> Tensor[N]``. The engine calls them once
  per tensor, on the merge device. They own ``task_vectors`` and may overwrite it (it is the
  engine's read buffer: working in place saves a copy of K tensors); a keyword-only
  ``generator: torch.Generator`` receives a generator seeded per tensor from the merge seed.
  Methods defined on the weights rather than the task vectors (SLERP, Karcher mean), on the
  tensor's rows (DELLA's per-row ranks) or on its place in the network (LiNeS' depth) declare a
  keyword-only ``base: torch.Tensor`` (the flat base tensor ``theta_0`` in the task vectors'
  dtype, read-only), ``shape: torch.Size`` (the tensor's shape) and/or ``name: str`` (the
  tensor's name); the engine passes them.
  A method that needs a statistic of the whole model before it can merge any tensor (TIES'
  trim over the flattened model) registers a ``model_statistic`` factory: the engine first
  streams every merged tensor's task vectors through the :class:`ModelStatistic` it returns
  (pass 1, as many sweeps as it asks for), then calls the method per tensor with the result
  as the keyword-only argument ``model_statistic`` (pass 2).
* ``"model"`` methods need the whole model (e.g. AdaMerging runs it):
  ``fn(base, finetuned, *, rules, **params)``; they work on in-memory state dicts only.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, Protocol, TypeVar

import torch
from pydantic import BaseModel

from clpeft import schema
from clpeft.errors import UserError
from clpeft.registry import close_matches

__all__ = ["MergeMethod", "ModelShape", "ModelStatistic", "get_method", "list_methods", "merge_method"]

Scope = Literal["tensor", "model"]
F = TypeVar("F", bound=Callable[..., Any])

_METHODS: dict[str, MergeMethod] = {}
_TENSOR_INPUTS = frozenset({"base", "shape", "name"})  # what the engine passes to tensor methods that ask for it


@dataclass(frozen=True)
class ModelShape:
    """What a :class:`ModelStatistic` knows before its first sweep.

    Attributes:
        numel: entries of all merged tensors together (``N`` of the flattened model; tensors
            copied from the base, skipped or averaged are not task vectors and not counted).
        num_tasks: ``K``, the number of task vectors.
        dtype: the task vectors' working dtype (float64 if any merged tensor is, else float32).
        device: where the task vectors are formed.
        names: the merged tensors' names, in merge order.
    """

    numel: int
    num_tasks: int
    dtype: torch.dtype
    device: torch.device
    names: tuple[str, ...] = ()


class ModelStatistic(Protocol):
    """A whole-model statistic computed by streaming every merged tensor's task vectors (pass 1).

    A statistic may also offer ``observe_differences(sources, base) -> bool``: the same as
    ``observe`` of the task vectors ``sources[k] - base`` (flat fine-tuned tensors, flat base in
    the compute dtype) without forming them; it returns ``False``, having counted nothing, where it
    cannot (the engine then forms the task vectors and calls ``observe``).
    """

    def wants_sweep(self) -> bool:
        """Whether another sweep over all merged tensors is needed."""

    def observe(self, task_vectors: torch.Tensor) -> None:
        """One tensor's ``(K, N_l)`` task vectors; the statistic may overwrite them."""

    def end_sweep(self) -> None:
        """Every merged tensor of this sweep has been observed."""

    def result(self) -> Any:
        """What the method receives as ``model_statistic`` in pass 2."""


StatisticFactory = Callable[[Mapping[str, Any], ModelShape], ModelStatistic | None]


@dataclass(frozen=True)
class MergeMethod:
    """A registered merge method.

    Attributes:
        name: registry name, equal to its module's file stem.
        fn: the function (see the module docstring for the two signatures).
        reference_url: the paper.
        scope: "tensor" or "model".
        linear: the merged task vector is a fixed linear combination of the task vectors,
            ``sum_k c_k tau_k``; :meth:`coefficients` recovers ``c``. LoRA adapters then merge
            straight from their factors.
        uses_generator: the function takes a ``generator`` for its randomness.
        schema: pydantic model of the parameters (``extra="forbid"``).
        model_statistic: ``(params, shape) -> ModelStatistic | None`` for methods that need a
            whole-model pass first (see the module docstring); None for the others.
        tensor_inputs: which of ``base``, ``shape`` and ``name`` the function takes (tensor scope).
    """

    name: str
    fn: Callable[..., Any]
    reference_url: str
    scope: Scope
    linear: bool
    uses_generator: bool
    schema: type[BaseModel]
    model_statistic: StatisticFactory | None = None
    tensor_inputs: frozenset[str] = frozenset()

    @property
    def description(self) -> str:
        """First line of the function's docstring."""
        return (inspect.getdoc(self.fn) or "").strip().splitlines()[0]

    @property
    def parameters(self) -> list[str]:
        return list(self.schema.model_fields)

    def validate(self, params: Mapping[str, Any], *, key: str = "parameters") -> dict[str, Any]:
        """Check parameter names and (for tensor methods) types; fill in the defaults.

        Raises:
            UserError: naming the parameter, with the closest spelling for an unknown one.
        """
        if self.scope == "model":  # callables and data loaders: no coercion, checked by the call; floats finite
            for name, value in params.items():
                if name not in self.schema.model_fields:
                    raise UserError(self._unknown(f"{key}.{name}", name, self.parameters))
                if isinstance(value, float) and not math.isfinite(value):
                    raise UserError(f"input should be a finite number, got {value!r}", key=f"{key}.{name}")
            return dict(params)
        validated = schema.validate(self.schema, dict(params), key, unknown=self._unknown)
        return {name: getattr(validated, name) for name in self.schema.model_fields}

    def _unknown(self, path: str, name: str, known: list[str]) -> str:
        return (
            f"{path}: unknown parameter of merge method '{self.name}'{close_matches(name, known)} "
            f"(its parameters: {', '.join(known) or 'none'})"
        )

    def coefficients(self, num_tasks: int, params: Mapping[str, Any], dtype: torch.dtype = torch.float64) -> list[float]:
        """The ``c_k`` of a linear method: the method applied to the identity matrix, in ``dtype``
        (the values the method itself uses on task vectors of that dtype)."""
        if not self.linear:
            raise TypeError(f"merge method '{self.name}' is not linear")
        return self.fn(torch.eye(num_tasks, dtype=dtype), **params).tolist()


def merge_method(
    name: str,
    *,
    reference_url: str,
    scope: Scope = "tensor",
    linear: bool = False,
    model_statistic: StatisticFactory | None = None,
) -> Callable[[F], F]:
    """Register ``fn`` as merge method ``name``.

    Every keyword-only argument is a parameter and must be annotated (use
    ``Annotated[float, Field(ge=0, description=...)]`` for ranges and help text naming the
    paper's symbol); NaN and infinity are refused for every float. ``generator``, ``base``,
    ``shape``, ``name`` and ``model_statistic`` are filled in by the engine, not parameters. A duplicate name or an
    unannotated parameter fails at import time.
    """

    def decorator(fn: F) -> F:
        if name in _METHODS and _METHODS[name].fn is not fn:
            raise ValueError(f"merge method '{name}' is already registered by {_METHODS[name].fn.__module__}")
        engine_supplied = {"rules"} if scope == "model" else {"generator", *_TENSOR_INPUTS}
        if model_statistic is not None:
            engine_supplied.add("model_statistic")
        keywords = {n for n, p in inspect.signature(fn).parameters.items() if p.kind is p.KEYWORD_ONLY}
        uses_generator = scope == "tensor" and "generator" in keywords
        tensor_inputs = frozenset(keywords & _TENSOR_INPUTS) if scope == "tensor" else frozenset()
        schema_model = schema.model_from_signature(
            f"{name}_parameters", fn, skip=engine_supplied, keyword_only=True, owner=f"merge method '{name}'"
        )
        _METHODS[name] = MergeMethod(name, fn, reference_url, scope, linear, uses_generator, schema_model, model_statistic, tensor_inputs)
        return fn

    return decorator


def get_method(name: str, *, key: str = "method") -> MergeMethod:
    """The registered method ``name``; an unknown name lists the close matches."""
    _load_builtins()
    if name not in _METHODS:
        raise UserError(
            f"unknown merge method '{name}'{close_matches(name, _METHODS)} (known: {', '.join(sorted(_METHODS))})",
            key=key,
        )
    return _METHODS[name]


def list_methods() -> list[MergeMethod]:
    """Every registered merge method, sorted by name."""
    _load_builtins()
    return [_METHODS[n] for n in sorted(_METHODS)]


def _load_builtins() -> None:
    import clpeft.merging.methods  # noqa: F401  (registers the built-in methods)
