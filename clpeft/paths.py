"""Where clpeft keeps files between runs: ``$CLPEFT_CACHE``, else ``~/.cache/clpeft``.

Feature caches live at the root (one folder per backbone and dataset), converted offline
weights under ``weights/``.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["cache_root", "weights_cache_dir"]


def cache_root() -> Path:
    """``$CLPEFT_CACHE`` (``~`` expanded) or ``~/.cache/clpeft``."""
    root = os.environ.get("CLPEFT_CACHE")
    return Path(root).expanduser() if root else Path.home() / ".cache" / "clpeft"


def weights_cache_dir() -> Path:
    """Where converted offline weights are kept: ``<cache root>/weights``."""
    return cache_root() / "weights"
