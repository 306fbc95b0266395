"""Learning without Forgetting.

Li & Hoiem, "Learning without Forgetting", ECCV 2016 / TPAMI 2017
(https://arxiv.org/abs/1606.09282). Before each experience the current model is frozen as a
teacher; training adds ``lambda_o * L_old``, a temperature-``T`` distillation of the teacher's
outputs on the old classes, to the cross-entropy on the new data (eq. 2 of the paper; no
``T^2`` factor, as in the paper, Avalanche's ``LwFPlugin`` and Mammoth's ``lwf``). Training equals
Avalanche's ``LwFPlugin`` with the same ``alpha`` and ``temperature``
(``tests/reference/test_avalanche_baselines.py``).

**On a generative LLM** (``backbone.name: generative_lm``, :mod:`clpeft.components.generative`)
the outputs are next-token distributions: the old model is the pretrained LLM with the LoRA
(flat keys ``lora_*``) as it was before the task (its adapters' values; no copy of the model),
and ``L_old`` is the temperature-``T`` KL between its and the current model's next-token
distributions at the new task's answer tokens, averaged over the tokens, added to the
answer-token cross-entropy.

Paper symbols: ``lambda_o`` -> ``alpha``, ``T`` -> ``temperature``.
"""

from typing import Annotated

import torch
import torch.nn.functional as F
from pydantic import Field

from clpeft.components.generative import GenerativeHooks, GenerativeOptions, InstructionTuning
from clpeft.components.regularization.distillation import distillation_loss, frozen_copy
from clpeft.data import Batch
from clpeft.experience import Experience
from clpeft.registry import register_strategy
from clpeft.schema import flat_options
from clpeft.strategy import Strategy


@register_strategy("lwf")
class LwF(GenerativeHooks, Strategy):
    """Learning without Forgetting: distil the previous model's outputs on old classes (Li & Hoiem 2016).

    Args:
        backbone: the feature extractor.
        alpha: weight ``lambda_o`` of the distillation loss.
        temperature: distillation temperature ``T``.
        generative: flat keys ``lora_*`` of the LoRA trained on a ``generative_lm`` backbone
            (:class:`~clpeft.components.generative.GenerativeOptions`).
    """

    @flat_options
    def __init__(
        self,
        backbone,
        alpha: Annotated[float, Field(ge=0)] = 1.0,
        temperature: Annotated[float, Field(gt=0)] = 2.0,
        generative: GenerativeOptions = GenerativeOptions(),
    ):
        super().__init__(backbone)
        self.alpha = alpha
        self.temperature = temperature
        self.teacher_head = None
        self.teacher_backbone = None
        self.generative = InstructionTuning.of(backbone, generative)
        self.old_adapters = None  # the generative path's old model

    def before_experience(self, exp: Experience) -> None:
        if self.generative:
            self.old_adapters = self.generative.snapshot() if exp.index > 0 else None
        elif self.head.n_classes > 0:
            self.teacher_head = frozen_copy(self.head)
            if not self.uses_features and not self.backbone.frozen:
                self.teacher_backbone = frozen_copy(self.backbone)
        super().before_experience(exp)

    def training_step(self, batch: Batch) -> torch.Tensor:
        if self.generative:
            if self.old_adapters is None:
                return self.generative.loss(batch.x)
            loss, old = self.generative.distillation(batch.x, self.old_adapters, self.temperature)
            return loss + self.alpha * old
        logits = self.predict(batch.x)
        loss = F.cross_entropy(logits, batch.y)
        if self.teacher_head is not None:
            with torch.no_grad():
                teacher_features = self.teacher_backbone(batch.x) if self.teacher_backbone is not None else self.embed(batch.x)
                old = self.teacher_head(teacher_features)
            loss = loss + self.alpha * distillation_loss(logits, old, self.temperature)
        return loss

    def after_experience(self, exp: Experience) -> None:
        self.teacher_head = None
        self.teacher_backbone = None
        self.old_adapters = None
