"""Where clpeft keeps files between runs: ``$CLPEFT_CACHE``, else ``~/.cache/clpeft``.

Feature caches live at the root (one folder per backbone and dataset), converted offline
weights under ``weights/``, compiled CPU kernels under ``kernels/``.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["cache_root", "kernels_cache_dir", "weights_cache_dir"]


def cache_root() -> Path:
    """``$CLPEFT_CACHE`` (``~`` expanded) or ``~/.cache/clpeft``."""
    root = os.environ.get("CLPEFT_CACHE")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "clpeft"


def weights_cache_dir() -> Path:
    """Where converted offline weights are kept: ``<cache root>/weights``."""
    return cache_root() / "weights"


def kernels_cache_dir() -> Path:
    """Where compiled CPU kernels are kept: ``<cache root>/kernels``."""
    return cache_root() / "kernels"
