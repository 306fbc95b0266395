"""Experience replay with a fixed-size memory.

Chaudhry et al., "On Tiny Episodic Memories in Continual Learning", 2019
(https://arxiv.org/abs/1902.10486); Rebuffi et al., "iCaRL: Incremental Classifier and
Representation Learning", CVPR 2017 (https://arxiv.org/abs/1611.07725), for class-balanced and
herding-selected memories. Each experience trains on its own data concatenated with the memory
(the union dataset of iCaRL and PyCIL/LAMDA-PILOT's ``replay``); after the experience the memory
is updated with the :class:`~clpeft.components.ReplayBuffer` policy. Avalanche's ``ReplayPlugin``
and Mammoth's ``er`` instead pair each batch of the experience with a batch of the memory: other
steps and batch compositions (``tests/reference/test_avalanche_baselines.py`` shows it, and that
clpeft's training equals Avalanche's ``Naive`` on the union and its ``class_balanced`` memory
sizes equal Avalanche's ``ClassBalancedBuffer``). ``herding`` selects on the
backbone's features of the experience's training data, computed once after training (eval mode,
no augmentation), as iCaRL does.

``ratio`` mixes in a fixed share of the memory instead of all of it: each experience draws
``round(ratio * |train|)`` stored samples (all when fewer are stored), the "replay ratio" of
continual instruction tuning (e.g. TRACE, Wang et al. 2023, https://arxiv.org/abs/2310.06762).

**On a generative LLM** (``backbone.name: generative_lm``, :mod:`clpeft.components.generative`)
the memory stores past tasks' (prompt, target) examples (as indices into their datasets), the
loss is the answer-token cross-entropy of a LoRA (flat keys ``lora_*``) on the new task's examples
and the replayed ones, and answers are generated and scored by each task's metric.

Paper symbols: memory size ``M`` (iCaRL's ``K``) -> ``mem_size``.
"""

from typing import Annotated

import torch
from pydantic import Field

from clpeft.components import ReplayBuffer
from clpeft.components.generative import GenerativeHooks, GenerativeOptions, InstructionTuning
from clpeft.components.memory.replay import Policy
from clpeft.data import DataView
from clpeft.experience import Experience
from clpeft.registry import register_strategy
from clpeft.schema import flat_options
from clpeft.strategy import Strategy


@register_strategy("replay")
class Replay(GenerativeHooks, Strategy):
    """Experience replay: train on new data plus a fixed-size memory of past samples (Chaudhry et al. 2019).

    Args:
        backbone: the feature extractor.
        mem_size: memory capacity ``M`` in samples.
        policy: ``reservoir`` sampling, a ``class_balanced`` random memory, or iCaRL's
            ``herding`` (``M // classes seen`` exemplars per class, chosen on the features).
        ratio: replayed samples per new training sample (``None``: the whole memory).
        generative: flat keys ``lora_*`` of the LoRA trained on a ``generative_lm`` backbone
            (:class:`~clpeft.components.generative.GenerativeOptions`).
    """

    @flat_options
    def __init__(
        self,
        backbone,
        mem_size: Annotated[int, Field(ge=0)] = 200,
        policy: Policy = "reservoir",
        ratio: Annotated[float, Field(gt=0)] | None = None,
        generative: GenerativeOptions = GenerativeOptions(),
    ):
        super().__init__(backbone)
        self.buffer = ReplayBuffer(mem_size, policy)
        self.ratio = ratio
        self.generative = InstructionTuning.of(backbone, generative)

    def train_data(self, exp: Experience) -> DataView:
        memory = self.buffer.view(exp.past)
        if self.ratio is not None and len(memory) > round(self.ratio * len(exp.train)):
            memory = memory.take(torch.randperm(len(memory))[: round(self.ratio * len(exp.train))])  # the engine seeds each experience
        return exp.train + memory

    def after_experience(self, exp: Experience) -> None:
        features = self._features(exp.train) if self.buffer.policy == "herding" else None
        self.buffer.update(exp, features=features)

    @torch.no_grad()
    def _features(self, view: DataView) -> torch.Tensor:
        """Backbone features of every sample of ``view``, in its order."""
        parts = [self.embed(batch.x).float().cpu() for batch in self.batches(view)]
        return torch.cat(parts) if parts else torch.empty(0, self.backbone.feature_dim)
