"""iCaRL: Incremental Classifier and Representation Learning.

Rebuffi et al., CVPR 2017 (https://arxiv.org/abs/1611.07725). Each experience trains on its data
plus a memory of exemplars, with the previous model's outputs on the old classes as targets
(Alg. 3); afterwards ``m = M // classes seen`` exemplars per class are kept, a new class's chosen
by herding on the current features (Alg. 4, :class:`~clpeft.components.ReplayBuffer`'s
``herding`` policy; memory and teacher are
:class:`~clpeft.components.regularization.exemplar_distillation.ExemplarDistillation`) and an old class's cut to its first ``m`` (Alg. 5). Classification is by the
nearest mean of exemplars, recomputed with the current model after every experience (Alg. 1,
:class:`~clpeft.components.heads.nearest_mean_of_exemplars.NearestMeanOfExemplars`); the trained
linear head only serves the loss.

``loss``:

* ``bce`` (the paper, Alg. 3, and Mammoth's ``models/icarl.py``): sigmoid binary cross-entropy on
  every seen class's output, averaged over samples and outputs, with one-hot targets for the new
  classes and the old model's sigmoid outputs for the old ones.
* ``ce`` (LAMDA-PILOT / PyCIL ``models/icarl.py``): cross-entropy over the seen classes plus the
  temperature-``T`` distillation of the old model's outputs on the old classes (no ``T^2``
  factor; PILOT's soft cross-entropy minus the teacher's entropy, a constant: the same gradients).

Mammoth adds ``opt_wd * sum theta^2`` to the loss (weight decay ``2 opt_wd`` of the optimizer,
``train.weight_decay`` here) and averages the class means of images and their horizontal flips
(an image-only addition, left out). ``tests/reference/test_classic_cil.py`` checks both losses,
the parameters after training and the exemplar means and predictions against the references.

Rank-consistent under ``torchrun`` (``tests/strategies/test_classic_cil_ddp.py``): herding and the class means are
passes over the whole experience or memory with the synchronised model, identical on every rank.

Paper symbols: memory size ``K`` -> ``mem_size``; PILOT's ``T`` -> ``temperature``.
"""

from __future__ import annotations

from typing import Annotated, Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from clpeft.components.heads.nearest_mean_of_exemplars import NearestMeanOfExemplars, labelled_features
from clpeft.components.regularization.distillation import distillation_loss
from clpeft.components.regularization.exemplar_distillation import ExemplarDistillation
from clpeft.data import Batch, DataView
from clpeft.experience import Experience
from clpeft.registry import register_strategy
from clpeft.strategy import Strategy


@register_strategy("icarl")
class ICaRL(Strategy):
    """iCaRL: herding exemplars, distillation and a nearest-mean-of-exemplars classifier (Rebuffi et al. 2017).

    Args:
        backbone: the feature extractor.
        mem_size: exemplar memory ``K`` in samples.
        loss: ``bce`` (the paper's, Mammoth's) or ``ce`` (cross-entropy plus distillation, PILOT's).
        temperature: distillation temperature ``T`` of the ``ce`` loss.
    """

    def __init__(
        self,
        backbone,
        mem_size: Annotated[int, Field(ge=1)] = 2000,
        loss: Literal["bce", "ce"] = "bce",
        temperature: Annotated[float, Field(gt=0)] = 2.0,
    ):
        super().__init__(backbone)
        self.rehearsal = ExemplarDistillation(mem_size)
        self.means = NearestMeanOfExemplars(backbone.feature_dim)
        self.loss = loss
        self.temperature = temperature

    def before_experience(self, exp: Experience) -> None:
        self.rehearsal.start(self)
        super().before_experience(exp)

    def train_data(self, exp: Experience) -> DataView:
        return self.rehearsal.data(exp)

    def training_step(self, batch: Batch) -> torch.Tensor:
        logits, old = self.rehearsal.outputs(self, batch)
        if self.loss == "bce":
            targets = F.one_hot(batch.y, logits.shape[1]).to(logits.dtype)
            if old is not None:
                targets[:, : old.shape[1]] = torch.sigmoid(old)
            return F.binary_cross_entropy_with_logits(logits, targets)
        loss = F.cross_entropy(logits, batch.y)
        return loss if old is None else loss + distillation_loss(logits, old, self.temperature)

    def after_experience(self, exp: Experience) -> None:
        self.rehearsal.finish(self, exp)
        self.means.grow_to(exp.n_classes_seen)  # a class without exemplars keeps a zero mean
        view = self.rehearsal.memory.view((*exp.past, exp))
        self.means.fit(*labelled_features(self.batches(view), self.embed, self.backbone.feature_dim))

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of the nearest mean of exemplars (the classes' means as of the last experience)."""
        return self.means(self.embed(x))
