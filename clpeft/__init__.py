"""clpeft: continual learning on pretrained models.

The public API: :class:`Strategy` and the ``register_*`` decorators for plug-ins,
:class:`Experience`/:class:`Scenario` for streams, :func:`clpeft.metrics.summarize` for metrics.
"""

from clpeft.data import ArrayDataset, Batch, DataView
from clpeft.errors import UserError
from clpeft.experience import Experience, Scenario
from clpeft.registry import register_backbone, register_scenario, register_strategy
from clpeft.strategy import Strategy

__version__ = "0.1.0"

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
