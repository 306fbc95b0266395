"""Reference-equivalence tests: clpeft against the official code that produced the published numbers.

The official repositories live outside clpeft, as published, in ``shared/refs/<folder>`` (see its
README: folders, licences, what to test against each). Nothing of theirs is copied into clpeft:
these tests import their files at test time and compare both sides on tiny models with the same
weights and the same seeded inputs.

Where they are: ``$CLPEFT_REFS``, else the first ``shared/refs`` beside the repository or one of
its parents. Without them (a user's clone) every test here skips with one line; with ``CI=true``
their absence is a failure.

The fixture ``load_reference`` gives :func:`load_reference`, which imports one reference module
with the reference's folder first on ``sys.path`` and stubs for the imports it needs but never uses
on the tested path (``wandb``, ``ipdb``, an old ``timm.models.layers``, ...); afterwards every
module it brought in is removed from ``sys.modules`` (and any it shadowed is put back), so
references whose top-level packages share names (``models``, ``utils``) never see each other, and
the references' files are never edited::

    def test_selection(load_reference):
        with load_reference("l2p-pytorch", "prompt") as ref:
            pool = ref.Prompt(length=5, embed_dim=8, prompt_pool=True, pool_size=10, top_k=5)

Every test here states its tolerance and says which mutation of clpeft's constants it was
checked to catch.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
import types
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest

_REPO = Path(__file__).resolve().parents[2]


def refs_root() -> Path | None:
    """The folder holding the reference repositories, or None when this machine has none."""
    explicit = os.environ.get("CLPEFT_REFS")
    if explicit:
        return Path(explicit)
    for parent in (_REPO, *_REPO.parents):
        candidate = parent / "shared" / "refs"
        if candidate.is_dir():
            return candidate
    return None


def ref_dir(folder: str) -> Path:
    """``shared/refs/<folder>``; skips the test (fails it with ``CI=true``) when it is absent."""
    root = refs_root()
    path = None if root is None else root / folder
    if path is None or not path.is_dir():
        message = f"reference code {folder!r} not found (set CLPEFT_REFS to the shared/refs folder)"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path


def stub_module(name: str, **attributes) -> types.ModuleType:
    """A module that only holds ``attributes`` (for imports a reference makes but the tested path never uses)."""
    module = types.ModuleType(name)
    module.__dict__.update(attributes)
    return module


@contextlib.contextmanager
def load_reference(
    folder: str, module: str, subdir: str = "", stubs: Mapping[str, types.ModuleType] | None = None
) -> Iterator[types.ModuleType]:
    """Import ``module`` from ``shared/refs/<folder>/<subdir>`` for the duration of the block.

    ``stubs`` (module name -> module) stand in for imports the reference needs only elsewhere.
    Everything imported inside the block that was not loaded before (the reference's own modules
    and the stubs) is removed from ``sys.modules`` afterwards.
    """
    path = ref_dir(folder) / subdir
    top = module.partition(".")[0]
    shadowed = {name: mod for name, mod in sys.modules.items() if name in (stubs or {}) or name == top or name.startswith(top + ".")}
    for name in shadowed:  # a loaded module of the same name would hide the reference's
        del sys.modules[name]
    before = set(sys.modules)
    saved_path = list(sys.path)
    sys.path.insert(0, str(path))
    sys.modules.update(stubs or {})
    try:
        yield importlib.import_module(module)
    finally:
        sys.path[:] = saved_path
        for name in set(sys.modules) - before:
            del sys.modules[name]
        sys.modules.update(shadowed)


@pytest.fixture(scope="session", name="load_reference")
def _load_reference_fixture():
    """:func:`load_reference` (see the module docstring)."""
    return load_reference


@pytest.fixture(scope="session", name="stub_module")
def _stub_module_fixture():
    """:func:`stub_module`, for the ``stubs`` of :func:`load_reference`."""
    return stub_module
