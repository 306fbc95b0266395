"""The options every gradient-based test-time adaptation method shares: its optimizer and what it updates.

Tent, EATA, CoTTA, RMT, Dual Teacher (and any method built on :class:`OnlineAdaptation`) take one
:class:`AdaptationOptions` parameter whose default holds the values that differ for that method
(``AdaptationOptions(params="all")`` for CoTTA); users write its fields as flat keys of the
``strategy`` section (``strategy.lr``), see :func:`clpeft.schema.flat_options`.

Defaults are those of Döbler et al.'s benchmark (github.com/mariodoebler/test-time-adaptation,
``conf.py`` ``OPTIM.*`` with the ``cfgs/cifar10_c/*.yaml`` files: Adam, lr 1e-3, beta1 0.9, no
weight decay, one step per test batch); SGD uses Nesterov momentum without dampening
(``OPTIM.NESTEROV``, as Tent's code).
"""

from typing import Literal

from pydantic import Field

from clpeft.schema import Options


class AdaptationOptions(Options):
    """The test-time optimizer of a TTA method and the parameters it updates."""

    optimizer: Literal["adam", "sgd"] = Field(
        "adam",
        description="``adam`` (the benchmark's CIFAR settings) or ``sgd`` (its ImageNet settings; Nesterov momentum when ``momentum > 0``)",
    )
    lr: float = Field(1e-3, gt=0, description="learning rate of the test-time optimizer")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum, or Adam's beta1 (beta2 is 0.999)")
    weight_decay: float = Field(0.0, ge=0, description="L2 penalty of the test-time optimizer")
    params: Literal["norm", "all"] = Field(
        "norm",
        description="what adapts: ``norm``, the normalisation layers' affine ``gamma``, ``beta`` (Tent), or "
        "``all``, every layer's weight and bias (CoTTA, RMT)",
    )
