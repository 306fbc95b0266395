"""clpeft: continual learning on pretrained models.

The public API: :class:`Strategy` and the ``register_*`` decorators for plug-ins,
:class:`Experience`/:class:`Scenario` for streams, :func:`clpeft.metrics.summarize` for metrics.

The names below are imported on first use (PEP 562), so ``import clpeft.merging`` or
``clpeft merge`` does not pay for the training stack (timm, torchvision).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from clpeft.data import ArrayDataset, Batch, DataView
    from clpeft.errors import UserError
    from clpeft.experience import Experience, Scenario
    from clpeft.registry import register_backbone, register_scenario, register_strategy
    from clpeft.strategy import Strategy

__version__ = "0.1.0"

_HOMES = {
    "ArrayDataset": "clpeft.data",
    "Batch": "clpeft.data",
    "DataView": "clpeft.data",
    "Experience": "clpeft.experience",
    "Scenario": "clpeft.experience",
    "Strategy": "clpeft.strategy",
    "UserError": "clpeft.errors",
    "register_backbone": "clpeft.registry",
    "register_scenario": "clpeft.registry",
    "register_strategy": "clpeft.registry",
}

__all__ = [
    "ArrayDataset",
    "Batch",
    "DataView",
    "Experience",
    "Scenario",
    "Strategy",
    "UserError",
    "register_backbone",
    "register_scenario",
    "register_strategy",
]


def __getattr__(name: str) -> Any:
    if name not in _HOMES:
        raise AttributeError(f"module 'clpeft' has no attribute '{name}'")
    value = getattr(importlib.import_module(_HOMES[name]), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return [*__all__, "__version__"]
