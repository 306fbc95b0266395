"""Seeds that make a run repeatable and its resume exact.

The engine re-seeds every random source from ``(seed, experience index)`` before each
experience (and from other keys at other fixed points), so an interrupted run resumed from its
last checkpoint draws exactly what an uninterrupted one would have drawn.
"""

from __future__ import annotations

import hashlib
import random

import numpy as np
import torch

__all__ = ["derive_seed", "seed_everything"]


def derive_seed(seed: int, *keys) -> int:
    """A 63-bit seed derived from ``seed`` and ``keys`` (stable across processes)."""
    digest = hashlib.sha256(repr((seed, *keys)).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's global generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
