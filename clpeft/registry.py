"""Name -> class registries for strategies, scenarios and backbones.

A built-in registers itself with a decorator (``@register_strategy("replay")``) in a module
that its package ``__init__`` imports explicitly; the package is imported the first time its
registry is queried, so nothing is scanned and importing :mod:`clpeft` stays cheap.
A config may also name a class that was never registered:

* ``package.module:Class`` imports the module;
* ``path/to/file.py:Class`` executes that one file (and nothing else), once per process;
* installed third-party packages register names through the entry-point groups
  ``clpeft.strategies``, ``clpeft.scenarios`` and ``clpeft.backbones``.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.metadata
import importlib.util
import inspect
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Generic, TypeVar

from clpeft.errors import UserError

T = TypeVar("T", bound=type)


def close_matches(name: str, options) -> str:
    """A ``"; did you mean 'x'?"`` suffix naming the closest spellings, or an empty string."""
    found = difflib.get_close_matches(str(name), list(options), n=3, cutoff=0.6)
    if not found:
        return ""
    return "; did you mean " + " or ".join(f"'{f}'" for f in found) + "?"


def describe(cls: type) -> str:
    """The first line of a class docstring: the one-line description `clpeft list` prints."""
    doc = inspect.getdoc(cls) or ""
    return doc.strip().splitlines()[0] if doc.strip() else ""


class Registry(Generic[T]):
    """A name -> class table for one kind of object.

    Args:
        kind: what is registered ("strategy", "scenario", "backbone"); used in messages.
        builtins: module whose import registers the built-in classes.
        entry_point_group: entry-point group through which installed packages add classes.
    """

    def __init__(self, kind: str, builtins: str, entry_point_group: str):
        self.kind = kind
        self._builtins = builtins
        self._group = entry_point_group
        self._classes: dict[str, T] = {}
        self._loaded = False
        self._files: dict[Path, object] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Class decorator recording ``cls`` under ``name``; a duplicate name is an error."""

        def decorator(cls: T) -> T:
            known = self._classes.get(name)
            if known is not None and known is not cls and _qualified(known) != _qualified(cls):
                raise ValueError(
                    f"{self.kind} name '{name}' is already registered by {_qualified(known)}"
                )
            self._classes[name] = cls
            cls.registered_name = name
            return cls

        return decorator

    def _load(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        importlib.import_module(self._builtins)
        for ep in importlib.metadata.entry_points(group=self._group):
            if ep.name not in self._classes:
                self.register(ep.name)(ep.load())

    def names(self) -> list[str]:
        self._load()
        return sorted(self._classes)

    def items(self) -> list[tuple[str, T]]:
        self._load()
        return sorted(self._classes.items())

    def get(self, name: str, *, key: str | None = None, base_dir: Path | None = None) -> T:
        """Resolve a registered name, ``package.module:Class`` or ``path/file.py:Class``.

        Args:
            name: the value of ``<section>.name`` in a config.
            key: the config key path, used in error messages.
            base_dir: directory of the config file; relative plug-in paths are tried against
                the working directory first, then against it.
        """
        key = key or f"{self.kind}.name"
        if not isinstance(name, str) or not name:
            raise UserError(f"expected the name of a {self.kind}, got {name!r}", key=key)
        if ":" in name:
            return self._load_plugin(name, key, base_dir)
        self._load()
        if name not in self._classes:
            raise UserError(
                f"unknown {self.kind} '{name}'{close_matches(name, self._classes)} "
                f"(run 'clpeft list' to see them all, or give 'module:Class' / 'file.py:Class')",
                key=key,
            )
        return self._classes[name]

    def _load_plugin(self, spec: str, key: str, base_dir: Path | None) -> T:
        target, _, attr = spec.rpartition(":")
        if target.endswith(".py"):
            module = self._exec_file(target, key, base_dir)
        else:
            try:
                module = importlib.import_module(target)
            except ImportError as exc:
                raise UserError(f"cannot import module '{target}' ({exc})", key=key) from None
        cls = getattr(module, attr, None)
        if not isinstance(cls, type):
            raise UserError(f"'{target}' has no class '{attr}'{close_matches(attr, dir(module))}", key=key)
        return cls

    def _exec_file(self, target: str, key: str, base_dir: Path | None):
        candidates = [Path(target)]
        if base_dir is not None and not Path(target).is_absolute():
            candidates.append(base_dir / target)
        path = next((p.resolve() for p in candidates if p.is_file()), None)
        if path is None:
            raise UserError(f"plug-in file not found: {target}", key=key)
        if path not in self._files:
            module_name = f"clpeft_plugin_{abs(hash(str(path)))}"
            spec = importlib.util.spec_from_file_location(module_name, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[module_name] = module
            spec.loader.exec_module(module)
            self._files[path] = module
        return self._files[path]


def _qualified(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


strategies: Registry = Registry("strategy", "clpeft.strategies", "clpeft.strategies")
scenarios: Registry = Registry("scenario", "clpeft.scenarios", "clpeft.scenarios")
backbones: Registry = Registry("backbone", "clpeft.backbones.builtin", "clpeft.backbones")

register_strategy = strategies.register
register_scenario = scenarios.register
register_backbone = backbones.register
