"""The YAML reference, generated from the config schemas and the classes' docstrings.

``docs/config_reference.md`` is :func:`config_reference`'s page, written by
``clpeft list --markdown > docs/config_reference.md``; ``tests/test_config_reference.py`` checks
that the two agree.
"""

from __future__ import annotations

import inspect
import re
import types
import typing

from pydantic import BaseModel

from clpeft import config, registry


def docstring_args(cls: type) -> dict[str, str]:
    """``{name: description}`` from the Google-style ``Args:`` section of a class docstring."""
    doc = inspect.getdoc(cls) or ""
    match = re.search(r"^Args:\n((?:[ \t]+.*\n?|\n)+)", doc, re.M)
    if not match:
        return {}
    out: dict[str, str] = {}
    current = None
    for line in match.group(1).splitlines():
        item = re.match(r"^\s{4}(\w+)(?: \(.*?\))?:\s*(.*)$", line)
        if item:
            current = item.group(1)
            out[current] = item.group(2).strip()
        elif current and line.strip():
            out[current] += " " + line.strip()
    return out


def _type_name(annotation) -> str:
    """A readable type, e.g. ``int >= 0 | None`` for ``Annotated[int, Field(ge=0)] | None``."""
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        return _type_name(args[0]) + "".join(_bounds(m) for m in args[1:])
    if origin in (typing.Union, types.UnionType):
        return " \\| ".join(_type_name(a) for a in args)
    if origin in (tuple, list, dict) and args:  # e.g. ``[float > 0 <= 1, float > 0 <= 1]`` for a pair
        inner = ", ".join(_type_name(a) for a in args)
        return f"[{inner}]" if origin is tuple else f"{origin.__name__}[{inner}]"
    text = getattr(annotation, "__name__", None) if isinstance(annotation, type) and not args else None
    text = text or str(annotation)
    return text.replace("typing.", "").replace("NoneType", "None").replace("|", "\\|")


_BOUNDS = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}


def _bounds(meta) -> str:
    """`` >= 0`` for ``Field(ge=0)`` (pydantic keeps bounds as annotated_types in ``metadata``)."""
    out = ""
    for item in getattr(meta, "metadata", [meta]):
        for attr, sign in _BOUNDS.items():
            value = getattr(item, attr, None)
            if value is not None:
                out += f" {sign} {value}"
    return out


def _shown(value) -> str:
    """``repr(value)`` with floats to 15 significant digits: a default computed at import (RanPAC's
    ``10.0 ** np.arange(-8, 9)``) differs in its last bit between CPUs, the page must not."""
    if isinstance(value, float):
        return repr(float(f"{value:.15g}"))
    if isinstance(value, (list, tuple)):
        shown = ", ".join(_shown(v) for v in value)
        return f"[{shown}]" if isinstance(value, list) else f"({shown}{',' if len(value) == 1 else ''})"
    return repr(value)


def _rows(model: type[BaseModel], help_text: dict[str, str]) -> list[str]:
    rows = []
    for name, info in model.model_fields.items():
        default = "required" if info.is_required() else f"`{_shown(info.default)}`"
        text = info.description or help_text.get(name, "")
        kind = _type_name(info.annotation) + "".join(_bounds(m) for m in info.metadata)
        rows.append(f"| `{name}` | {kind} | {default} | {text} |")
    return rows


_INTRO = """# YAML reference

Every key of a run config: the sections, then every registered scenario, backbone and strategy
with its own parameters. Generated from the schemas and the classes' docstrings
(`clpeft list --markdown > docs/config_reference.md`; `tests/test_config_reference.py` checks it
is current). The defaults let a config run quickly as a check; the configs under `configs/` that
mirror a paper set that paper's values (`docs/published_setups.md`)."""


def config_reference() -> str:
    """The Markdown page: tables of every config section and registered class."""
    head = "| key | type | default | meaning |\n|---|---|---|---|"
    parts = [
        _INTRO,
        "Top level: `seed` (int, default 0), `out` (run directory, default `runs/<config>-<strategy>-<time>`), and the sections below.",
    ]
    for section, model in (("train", config.TrainConfig), ("eval", config.EvalConfig), ("logging", config.LoggingConfig)):
        parts.append(f"#### `{section}`\n\n{head}\n" + "\n".join(_rows(model, {})))
    for section, reg in config.NAMED_SECTIONS.items():
        for name, cls in reg.items():
            rows = _rows(config.schema_of(cls, section), docstring_args(cls))
            body = f"{head}\n" + "\n".join(rows) if rows else "(no parameters)"
            parts.append(f"#### `{section}: {{name: {name}}}` — {registry.describe(cls)}\n\n{body}")
    return "\n\n".join(parts) + "\n"
