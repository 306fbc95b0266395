"""Joint training on everything seen so far: the usual upper bound.

At experience ``i`` the model trains on the union of the training data of experiences
``0..i`` (the "cumulative" upper bound of Avalanche and Mammoth's ``joint``; training equals
Avalanche's ``Cumulative``, ``tests/reference/test_avalanche_baselines.py``), so row ``i`` of the
accuracy matrix is what a non-continual learner reaches on the same classes.

**On a generative LLM** (``backbone.name: generative_lm``, :mod:`clpeft.components.generative`)
a LoRA (flat keys ``lora_*``) trains on every task's examples seen so far with the answer-token
loss (the multi-task upper bound of O-LoRA's tables, "MTL", there trained once on all tasks).
"""

from clpeft.components.generative import GenerativeHooks, GenerativeOptions, InstructionTuning
from clpeft.data import DataView
from clpeft.experience import Experience
from clpeft.registry import register_strategy
from clpeft.schema import flat_options
from clpeft.strategy import Strategy


@register_strategy("joint")
class Joint(GenerativeHooks, Strategy):
    """Train on the union of all experiences seen so far (upper bound, not continual).

    Args:
        backbone: the feature extractor.
        generative: flat keys ``lora_*`` of the LoRA trained on a ``generative_lm`` backbone
            (:class:`~clpeft.components.generative.GenerativeOptions`).
    """

    @flat_options
    def __init__(self, backbone, generative: GenerativeOptions = GenerativeOptions()):
        super().__init__(backbone)
        self.generative = InstructionTuning.of(backbone, generative)

    def train_data(self, exp: Experience) -> DataView:
        view = DataView([])
        for e in (*exp.past, exp):
            view = view + e.train
        return view
