"""Name -> class registries for strategies, scenarios and backbones.

A built-in registers itself with a decorator (``@register_strategy("replay")``) in a module of
its package (``strategies/``, ``scenarios/``, ``clpeft/backbones/``), which imports every module
it holds; the package is imported the first time its registry is queried, so importing
:mod:`clpeft` stays cheap. A config may also name a class that was never registered:

* ``package.module:Class`` imports the module from ``sys.path`` as the user set it: the
  directory Python itself put there for ``python -m``/``-c`` (the current directory) is left
  out, so ``python -m clpeft`` finds the same modules as the ``clpeft`` command;
* ``path/to/file.py:Class`` executes that one file (and nothing else: not its siblings, not its
  directory's ``__init__.py`` or ``conftest.py``), once per process;
* installed third-party packages register names through the entry-point groups
  ``clpeft.strategies``, ``clpeft.scenarios`` and ``clpeft.backbones``; an entry point is
  loaded only when its name is asked for (or when every class is listed).

A plug-in class must subclass the registry's base class (:class:`~clpeft.strategy.Strategy`,
:class:`~clpeft.experience.Scenario`, :class:`~clpeft.backbones.base.Backbone`).
"""

from __future__ import annotations

import difflib
import hashlib
import importlib
import importlib.metadata
import importlib.util
import inspect
import os
import sys
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Generic, TypeVar

from clpeft.errors import UserError

T = TypeVar("T", bound=type)

# Where Python started: `python -m`/`-c` put this directory (or '') first on sys.path.
_START_DIR = os.getcwd()


def close_matches(name: str, options) -> str:
    """A ``"; did you mean 'x'?"`` suffix naming the closest spellings, or an empty string.

    At most three, and only those about as close as the best one (a one-letter typo of
    ``class_incremental`` does not also suggest ``few_shot_class_incremental``).
    """
    found = difflib.get_close_matches(str(name), list(options), n=3, cutoff=0.6)
    if not found:
        return ""
    best = difflib.SequenceMatcher(None, str(name), found[0]).ratio()
    found = [f for f in found if difflib.SequenceMatcher(None, str(name), f).ratio() >= best - 0.1]
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
        base: ``"module:Class"`` every plug-in or entry-point class must subclass (None: any class).
    """

    def __init__(self, kind: str, builtins: str, entry_point_group: str, base: str | None = None):
        self.kind = kind
        self._builtins = builtins
        self._group = entry_point_group
        self._base = base
        self._classes: dict[str, T] = {}
        self._entry_points: dict[str, importlib.metadata.EntryPoint] = {}
        self._loaded = False
        self._files: dict[Path, object] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Class decorator recording ``cls`` under ``name``; a duplicate name is an error."""

        def decorator(cls: T) -> T:
            known = self._classes.get(name)
            if known is not None and known is not cls and _qualified(known) != _qualified(cls):
                raise ValueError(f"{self.kind} name '{name}' is already registered by {_qualified(known)}")
            self._classes[name] = cls
            cls.registered_name = name
            return cls

        return decorator

    def _load(self) -> None:
        """Import the built-ins and note (without loading) the installed entry points."""
        if self._loaded:
            return
        self._loaded = True
        importlib.import_module(self._builtins)
        for ep in importlib.metadata.entry_points(group=self._group):
            if ep.name not in self._classes:
                self._entry_points.setdefault(ep.name, ep)

    def _load_entry_point(self, name: str, key: str) -> T:
        ep = self._entry_points.pop(name)
        try:
            cls = ep.load()
        except (ImportError, AttributeError) as exc:
            raise UserError(f"{self.kind} '{name}' (entry point {ep.value}) cannot be loaded: {exc}", key=key) from None
        self._check_base(cls, f"entry point {ep.value}", key)
        return self.register(name)(cls)

    def names(self) -> list[str]:
        self._load()
        return sorted({*self._classes, *self._entry_points})

    def items(self) -> list[tuple[str, T]]:
        """Every (name, class), loading every entry point (this is what `clpeft list` shows)."""
        self._load()
        for name in list(self._entry_points):
            self._load_entry_point(name, f"{self.kind}.name")
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
        if name not in self._classes and name in self._entry_points:
            return self._load_entry_point(name, key)
        if name not in self._classes:
            raise UserError(
                f"unknown {self.kind} '{name}'{close_matches(name, self.names())} "
                f"(run 'clpeft list' to see them all, or give 'module:Class' / 'file.py:Class')",
                key=key,
            )
        return self._classes[name]

    def _load_plugin(self, spec: str, key: str, base_dir: Path | None) -> T:
        target, _, attr = spec.rpartition(":")
        if not target or not attr.isidentifier():
            raise UserError(f"expected 'package.module:Class' or 'path/file.py:Class', got {spec!r}", key=key)
        if target.endswith(".py"):
            module = self._exec_file(target, key, base_dir)
        else:
            module = import_user_module(target, key)
        cls = getattr(module, attr, None)
        if not isinstance(cls, type):
            raise UserError(f"'{target}' has no class '{attr}'{close_matches(attr, dir(module))}", key=key)
        self._check_base(cls, spec, key)
        return cls

    def _check_base(self, cls: type, where: str, key: str) -> None:
        if self._base is None:
            return
        module, _, name = self._base.partition(":")
        base = getattr(importlib.import_module(module), name)
        if not issubclass(cls, base):
            raise UserError(f"{where} is not a {self.kind}: {cls.__name__} must subclass {self._base.replace(':', '.')}", key=key)

    def _exec_file(self, target: str, key: str, base_dir: Path | None):
        """Execute exactly the named file as a fresh module (its directory is not put on sys.path)."""
        candidates = [Path(target)]
        if base_dir is not None and not Path(target).is_absolute():
            candidates.append(base_dir / target)
        path = next((p.resolve() for p in candidates if p.is_file()), None)
        if path is None:
            raise UserError(f"plug-in file not found: {target}", key=key)
        if path not in self._files:
            module_name = f"clpeft_plugin_{hashlib.sha256(str(path).encode()).hexdigest()[:16]}"
            spec = importlib.util.spec_from_file_location(module_name, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[module_name] = module
            try:
                spec.loader.exec_module(module)
            except SyntaxError as exc:
                del sys.modules[module_name]
                raise UserError(f"plug-in file {path}:{exc.lineno}: syntax error: {exc.msg}", key=key) from None
            except ImportError as exc:
                del sys.modules[module_name]
                raise UserError(
                    f"plug-in file {path}: {exc}; only the named file is executed (its directory is not on "
                    f"sys.path): install its helpers or put them on PYTHONPATH",
                    key=key,
                ) from None
            except (Exception, SystemExit) as exc:  # the plug-in's own error: one line, where it was raised
                del sys.modules[module_name]
                raise UserError(f"plug-in file {_raised_at(exc, path)}: {_plugin_failure(exc)}", key=key) from None
            except BaseException:
                del sys.modules[module_name]
                raise
            self._files[path] = module
        return self._files[path]


def _raised_at(exc: BaseException, path: Path) -> str:
    """``path:line`` of the innermost frame of ``exc`` in the plug-in file (``path`` if none)."""
    lines = [frame.lineno for frame in traceback.extract_tb(exc.__traceback__) if Path(frame.filename) == path]
    return f"{path}:{lines[-1]}" if lines else str(path)


def _plugin_failure(exc: BaseException) -> str:
    if isinstance(exc, SystemExit):
        return f"it called sys.exit({exc.code!r}) while being imported; a plug-in module defines classes, it does not run a program"
    return f"{type(exc).__name__} while importing it: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"


def import_user_module(target: str, key: str):
    """Import a module a config names, leaving out the directory Python added on its own.

    See the module docstring. Errors become a :class:`UserError` for ``key``. Other config
    values that name a module (e.g. ``scenario.benchmark``) should import through this too.
    """
    with _without_implicit_path():
        try:
            return importlib.import_module(target)
        except SystemExit as exc:
            raise UserError(f"module '{target}': {_plugin_failure(exc)}", key=key) from None
        except (ImportError, ValueError, TypeError) as exc:  # ValueError/TypeError: '..x', 'a..b'
            raise UserError(
                f"cannot import module '{target}' ({exc}); modules are found on PYTHONPATH and among installed "
                f"packages, not in the current directory; or name a file: {target.rpartition('.')[2]}.py:Class",
                key=key,
            ) from None


def _implicit_path_positions() -> list[int]:
    """Positions in sys.path of the entries Python put there for the directory it started in.

    Every ``''`` (``python -c``, the REPL) and, for ``python -m``, the first occurrence of the
    start directory (Python inserts it in front of everything else). A directory the user
    listed in PYTHONPATH is the user's choice and stays.
    """
    if sys.flags.safe_path:
        return []
    positions = [i for i, p in enumerate(sys.path) if p == ""]
    main_spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    user = {os.path.abspath(p) for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p}
    if main_spec is not None and _START_DIR in sys.path and os.path.abspath(_START_DIR) not in user:
        positions.append(sys.path.index(_START_DIR))
    return sorted(positions)


@contextmanager
def _without_implicit_path() -> Iterator[None]:
    removed = [(i, sys.path[i]) for i in _implicit_path_positions()]
    for i, _ in reversed(removed):
        del sys.path[i]
    try:
        yield
    finally:
        for i, entry in removed:
            sys.path.insert(i, entry)


def _qualified(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


strategies: Registry = Registry("strategy", "clpeft.strategies", "clpeft.strategies", "clpeft.strategy:Strategy")
scenarios: Registry = Registry("scenario", "clpeft.scenarios", "clpeft.scenarios", "clpeft.experience:Scenario")
backbones: Registry = Registry("backbone", "clpeft.backbones.builtin", "clpeft.backbones", "clpeft.backbones.base:Backbone")

register_strategy = strategies.register
register_scenario = scenarios.register
register_backbone = backbones.register
