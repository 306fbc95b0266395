"""The test-time adaptation methods' common frame as a base class: options checked, model prepared, modes kept.

Every method built on :class:`~clpeft.components.tta.online_adaptation.OnlineAdaptation` (Tent,
Wang et al., ICLR 2021, https://arxiv.org/abs/2006.10726, section 3, and the methods after it)
handles only test-time experiences, reads raw inputs, refuses at construction a backbone whose
chosen parameters it cannot adapt, and configures its model when a test-time experience begins.
A method subclasses :class:`AdaptingStrategy`, overrides :meth:`~AdaptingStrategy.prepare_adaptation`
when it adapts a part of the model or sets something up from the source model, and calls
``self.adaptation.begin_batch(self)`` first in ``adapt``.
"""

from __future__ import annotations

from clpeft.components.tta.online_adaptation import OnlineAdaptation, check_adaptable, classifier
from clpeft.components.tta.options import AdaptationOptions
from clpeft.experience import Experience
from clpeft.strategy import Strategy


class AdaptingStrategy(Strategy):
    """A test-time adaptation method (base class): its :class:`OnlineAdaptation` is prepared when a test-time experience begins.

    Args:
        backbone: the source feature extractor.
        online: the test-time optimizer and the adapted parameters; ``None``: no parameter
            is updated (LAME).
        batch_statistics: BatchNorm layers use test-batch statistics.
    """

    supported_scenarios = ("test_time_adaptation",)
    cache_features = False

    def __init__(self, backbone, online: AdaptationOptions | None, batch_statistics: bool = True):
        super().__init__(backbone)
        if online is not None:
            check_adaptable(backbone, online.params, self.registered_name)
        self.adaptation = OnlineAdaptation(online, batch_statistics)

    def before_experience(self, exp: Experience) -> None:
        super().before_experience(exp)
        if exp.train is None:
            self.prepare_adaptation(exp)

    def prepare_adaptation(self, exp: Experience) -> None:
        """Configure the model for the test-time experience ``exp``: here the whole classifier,
        nothing set up from the source model."""
        self.adaptation.prepare(self, classifier(self.backbone, self.head))
