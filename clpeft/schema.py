"""Typed parameter schemas, built and checked one way for every configurable thing.

A registered class's config section (its typed ``__init__``) and a merge method's parameters
(its keyword-only arguments) both become a pydantic model here (:func:`model_from_signature`,
as mergekit's ``@merge_method`` in ``mergekit/merge_methods/easy_define.py``), and both are
checked by :func:`validate`: the same coercion, numbers only where numbers are meant, and one
line per mistake naming the key path, with the closest spellings of an unknown key.

Options several classes share are an :class:`Options` model (peft's nested configs are the
model): a class takes it as one typed parameter whose default holds the values that differ for
that class, and :func:`flat_options` lets users still write its fields as flat keys of the
section. The schema builds the options object from those keys, so its validators (rules spanning
fields) run whether the class comes from YAML or from Python.
"""

from __future__ import annotations

import collections.abc
import functools
import inspect
import reprlib
import types
import typing
from collections.abc import Callable, Container
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, model_validator

from clpeft.errors import UserError, UserErrors
from clpeft.registry import close_matches

__all__ = ["Options", "flat_options", "flat_params", "model_from_signature", "validate", "unknown_key"]

# extra keys are errors; NaN and infinity are refused for every float
STRICT = ConfigDict(extra="forbid", arbitrary_types_allowed=True, allow_inf_nan=False)


class Options(BaseModel):
    """A typed block of options shared by several classes (immutable, unknown keys refused).

    Subclass it with described fields; a class takes it as a parameter whose default is an
    instance with that class's values (``online: AdaptationOptions = AdaptationOptions(params="all")``)
    and decorates ``__init__`` with :func:`flat_options`.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    def changed(self) -> list[str]:
        """The fields whose values differ from the class's defaults, in declaration order."""
        return [name for name, info in type(self).model_fields.items() if getattr(self, name) != info.default]


# ----------------------------------------------------------------------------- flat options


def _options_type(annotation) -> type[Options] | None:
    return annotation if isinstance(annotation, type) and issubclass(annotation, Options) else None


def flat_options(init: Callable) -> Callable:
    """Let ``init``'s :class:`Options` parameters be given as their fields, flat.

    The decorated function's signature lists each options field in place of its parameter, with
    the field's type, bounds and description and the parameter default's value, so callers
    (``Tent(backbone, lr=5e-3)``), :func:`model_from_signature` and the YAML reference all see
    flat keys. A call gathers those keys into the options object, validated (a mistake is a
    :class:`UserError` naming the key), and passes it to ``init``; the object itself may be
    passed instead, under the parameter's name.
    """
    signature = inspect.signature(init)
    hints = typing.get_type_hints(init, include_extras=True)
    blocks: dict[str, type[Options]] = {}
    flat: list[inspect.Parameter] = []
    for p in signature.parameters.values():
        options = _options_type(hints.get(p.name))
        if options is None:
            flat.append(p.replace(annotation=hints.get(p.name, p.annotation)))
            continue
        if not isinstance(p.default, options):
            raise TypeError(f"{init.__qualname__}: '{p.name}' needs a default {options.__name__}(...) holding this class's values")
        blocks[p.name] = options
        for name, info in options.model_fields.items():
            annotation = typing.Annotated[(info.annotation, *info.metadata, Field(description=info.description))]
            flat.append(inspect.Parameter(name, p.kind, default=getattr(p.default, name), annotation=annotation))
    flat_signature = signature.replace(parameters=flat)
    defaults = {name: signature.parameters[name].default for name in blocks}

    @functools.wraps(init)
    def wrapper(*args, **kwargs):
        given = {name: kwargs.pop(name) for name in blocks if name in kwargs}
        bound = flat_signature.bind(*args, **kwargs)
        for name, options in blocks.items():
            fields = {k: bound.arguments.pop(k) for k in options.model_fields if k in bound.arguments}
            if name in given and fields:
                raise TypeError(f"{init.__qualname__}: give '{name}' or its fields ({', '.join(fields)}), not both")
            base = given.get(name, defaults[name])
            given[name] = validate(options, {**base.model_dump(), **fields}, "") if fields else base
        return init(*bound.args, **bound.kwargs, **given)

    wrapper.__signature__ = flat_signature
    wrapper.__annotations__ = {p.name: p.annotation for p in flat if p.annotation is not inspect.Parameter.empty}
    wrapper.__flat_options__ = blocks
    del wrapper.__wrapped__  # inspect and typing read the flat signature, not the wrapped one
    return wrapper


def flat_params(params: dict) -> dict:
    """``params`` with each :class:`Options` value replaced by its fields: the flat keys a config has.

    For a ``check_config(params)`` that reads a config's flat keys, called from an ``__init__``
    with its ``locals()``.
    """
    flat: dict = {}
    for name, value in params.items():
        flat.update(value.model_dump() if isinstance(value, Options) else {name: value})
    return flat


# ----------------------------------------------------------------------------- building


def model_from_signature(
    name: str, fn: Callable, *, skip: Container[str] = (), keyword_only: bool = False, owner: str | None = None
) -> type[BaseModel]:
    """The pydantic model of ``fn``'s parameters (each parameter a field, required without a default).

    Args:
        name: the model's name.
        fn: the typed function (an ``__init__`` after :func:`flat_options` lists flat keys).
        skip: parameters that are not options (``self``, arguments supplied by the caller).
        keyword_only: only keyword-only parameters are options (a merge method's).
        owner: every option must be annotated; an unannotated one fails naming ``owner``.
            Without it, an unannotated parameter takes its default's type (``Any`` for none).

    The flat fields of :func:`flat_options` blocks are checked together by building the block,
    so its validators (rules spanning fields) apply to a config too.
    """
    try:
        hints = typing.get_type_hints(fn, include_extras=True)
    except Exception:  # an unresolvable annotation: the raw ones (an error where annotations are required)
        if owner is not None:
            raise
        hints = {}
    fields: dict[str, Any] = {}
    for pname, p in inspect.signature(fn).parameters.items():
        if pname in skip or p.kind in (p.VAR_KEYWORD, p.VAR_POSITIONAL):
            continue
        if keyword_only and p.kind is not p.KEYWORD_ONLY:
            continue
        annotation = hints.get(pname, p.annotation)
        if annotation is inspect.Parameter.empty:
            if owner is not None:
                raise TypeError(f"{owner}: parameter '{pname}' needs a type annotation")
            annotation = Any if p.default is inspect.Parameter.empty or p.default is None else type(p.default)
        fields[pname] = (annotation, ... if p.default is inspect.Parameter.empty else p.default)
    blocks = getattr(fn, "__flat_options__", {})
    validators = {f"_build_{block}": model_validator(mode="after")(_builder(options)) for block, options in blocks.items()}
    return create_model(name, __config__=STRICT, __validators__=validators, **fields)


def _builder(options: type[Options]):
    def build(section: BaseModel) -> BaseModel:
        try:
            options.model_validate({k: getattr(section, k) for k in options.model_fields})
        except ValidationError as exc:  # the fields are valid one by one: a rule spanning them failed
            raise ValueError("; ".join(e["msg"].removeprefix("Value error, ") for e in exc.errors())) from None
        return section

    return build


# ----------------------------------------------------------------------------- checking


def unknown_key(path: str, name: str, known: list[str]) -> str:
    """The line for an unknown key of a config section."""
    return f"{path}: unknown key{close_matches(name, known)}; known keys: {', '.join(known)}"


def validate(model: type[BaseModel], data: dict, prefix: str, unknown: Callable[[str, str, list[str]], str] = unknown_key) -> BaseModel:
    """``data`` validated by ``model``; every mistake a line naming its key under ``prefix``.

    Raises:
        UserError: one line per mistake (:class:`UserErrors` for several); ``unknown(path,
            name, known keys)`` words an unknown key.
    """
    hit = _bool_as_number(model, data, prefix)
    if hit is not None:
        raise UserError(f"{hit[0]}: expected a number, got the boolean {str(hit[1]).lower()}; write the number")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise UserErrors.of([UserError(_format_one(e, prefix, model, unknown)) for e in exc.errors()]) from None


def _format_one(e, prefix: str, model: type[BaseModel], unknown) -> str:
    loc = _user_path(model, e["loc"])
    path = ".".join([prefix, *loc]) if prefix else ".".join(loc)
    kind = e["type"]
    if kind == "extra_forbidden":
        return unknown(path, loc[-1], _fields_at(model, loc[:-1]))
    if kind == "missing":
        return f"{path}: missing required value"
    msg = e["msg"]
    got = reprlib.repr(e.get("input"))  # bounded: a YAML alias can make a value enormous
    if not loc:  # a rule spanning fields: its message names them
        msg = msg.removeprefix("Value error, ")
        return f"{path}: {msg}" if path else msg
    return f"{path}: {msg[:1].lower()}{msg[1:]}, got {got}"  # keep names such as RandomCrop as written


def _user_path(model: type[BaseModel], loc: tuple) -> list[str]:
    """The part of a pydantic error location a user can write: field names and list indices.

    Pydantic adds tags for union branches and validators (``list[int]``, ``function-after``);
    they are not keys and are dropped.
    """
    path: list[str] = []
    current: type[BaseModel] | None = model
    for part in loc:
        if isinstance(part, int):
            path[-1] += f"[{part}]" if path else str(part)
            continue
        fields = current.model_fields if current is not None else {}
        if part not in fields and not (current is not None and current.model_config.get("extra") == "forbid" and not path):
            break
        path.append(str(part))
        ann = fields[part].annotation if part in fields else None
        current = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
    return path or [str(part) for part in loc[:1]]


def _fields_at(model: type[BaseModel], loc: list[str]) -> list[str]:
    for part in loc:
        info = model.model_fields.get(part)
        ann = getattr(info, "annotation", None)
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return []
        model = ann
    return list(model.model_fields)


def _bool_as_number(annotation, value, path: str) -> tuple[str, bool] | None:
    """``(path, value)`` of a boolean given where only numbers are accepted, else ``None``.

    Pydantic reads ``true`` as 1 for an ``int`` or ``float`` field (``epochs: true`` would train
    one epoch); a config that means a number writes one.
    """
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        return _bool_as_number(args[0], value, path)
    if isinstance(value, bool):
        return None if _admits_bool(annotation) else (path, value)
    if origin in (typing.Union, types.UnionType):  # wrong only if every branch says so
        hits = [_bool_as_number(a, value, path) for a in args if a is not type(None)]
        return hits[0] if all(hits) else None
    if isinstance(annotation, type) and issubclass(annotation, BaseModel) and isinstance(value, dict):
        fields = annotation.model_fields
        pairs = [(fields[k].annotation, v, f"{path}.{k}" if path else k) for k, v in value.items() if k in fields]
    elif isinstance(value, (list, tuple)) and origin in (list, tuple, set, frozenset, collections.abc.Sequence) and args:
        fixed = origin is tuple and Ellipsis not in args and len(args) == len(value)
        pairs = [(args[i] if fixed else args[0], v, f"{path}[{i}]") for i, v in enumerate(value)]
    elif isinstance(value, dict) and origin in (dict, collections.abc.Mapping) and len(args) == 2:
        pairs = [(args[1], v, f"{path}.{k}") for k, v in value.items()]
    else:
        return None
    return next((hit for hit in (_bool_as_number(*pair) for pair in pairs) if hit), None)


def _admits_bool(annotation) -> bool:
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        return _admits_bool(args[0])
    if origin in (typing.Union, types.UnionType):
        return any(_admits_bool(a) for a in args)
    if origin is Literal:  # only a literal of numbers alone would take a boolean as a number
        return not all(type(a) in (int, float) for a in args)
    return annotation not in (int, float)
