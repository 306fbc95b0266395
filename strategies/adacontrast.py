"""AdaContrast: contrastive test-time adaptation with refined pseudo-labels.

Chen et al., "Contrastive Test-Time Adaptation", CVPR 2022 (https://arxiv.org/abs/2204.10377),
as in the code of Döbler et al.'s benchmark (``classification/methods/adacontrast.py``). On every
test batch, with a weak view and two strong views of each image (:class:`ContrastiveViews`) and
the model in training mode (BatchNorm on batch statistics, its running statistics moving):

1. pseudo-labels of the weak views: their argmax, and once 1,024 samples are labelled, the argmax
   of the mean probability of the ``k`` nearest features in the bank (eq. 1-2,
   :class:`ContrastiveMemory`);
2. the momentum (key) model follows the model, ``theta' <- m theta' + (1 - m) theta``; the query
   is the first strong view's normalised features, the key the momentum model's of the second;
   the keys and pseudo-labels enter the queue;
3. one optimizer step on ``alpha L_cls + beta L_ins + eta L_div``: the cross-entropy of the
   strong view to the pseudo-labels (eq. 5), the class-aware instance loss against the queue
   (eq. 4, temperature ``tau``), and the diversity term ``sum_c p_bar_c log p_bar_c`` of the mean
   prediction (eq. 6);
4. the momentum model's features and probabilities of the weak views enter the bank.

The prediction returned is the adapted model's on the test batch, in evaluation mode (BatchNorm on
the running statistics updated in steps 1-4). Every weight and bias adapts. Defaults are the
CIFAR-10-C settings of the benchmark (``cfgs/cifar10_c/adacontrast.yaml`` over ``conf.py``: SGD
lr 2e-4, Nesterov momentum 0.9, weight decay 1e-4, ``m`` 0.999, ``tau`` 0.07, ``K`` 16,384,
``k`` 10 cosine neighbours, every loss weight 1).

Paper symbols: ``m`` -> ``ema_momentum``, ``tau`` -> ``temperature``, ``K`` -> ``queue_size``,
``k`` -> ``num_neighbors``, ``gamma_cls, gamma_ins, gamma_div`` -> ``alpha``, ``beta``, ``eta``.
"""

from typing import Annotated, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from clpeft.components.regularization.ema import EMATeacher
from clpeft.components.tta.contrastive_memory import ContrastiveMemory
from clpeft.components.tta.contrastive_views import ContrastiveViews
from clpeft.components.tta.online_adaptation import OnlineAdaptation, classifier
from clpeft.components.tta.options import AdaptationOptions
from clpeft.experience import Experience
from clpeft.registry import register_strategy
from clpeft.schema import flat_options
from clpeft.strategy import Strategy


def _set_training(module: nn.Module, mode: bool) -> None:
    """Every submodule's mode, bypassing ``train`` overrides (a teacher, a frozen backbone stay in eval)."""
    for m in module.modules():
        m.training = mode


@register_strategy("adacontrast")
class AdaContrast(Strategy):
    """AdaContrast: pseudo-labels refined by nearest neighbours, MoCo instance contrast and diversity (Chen et al. 2022).

    Args:
        backbone: the source feature extractor.
        online: the test-time optimizer and the adapted parameters, written flat (``lr``, ``params``, ...); every weight and bias adapts.
        ema_momentum: ``m`` of the momentum (key) model.
        temperature: ``tau`` of the instance logits.
        queue_size: ``K``, entries of the key queue and of the feature bank.
        num_neighbors: ``k`` of the pseudo-label refinement.
        distance: ``cosine`` or ``euclidean`` distance of the refinement.
        class_aware: leave queue entries of the query's pseudo-label out of the negatives.
        alpha: weight of the classification loss.
        beta: weight of the instance loss.
        eta: weight of the diversity loss.
        supervision: which view the classification and diversity losses see: ``weak_strong`` (the
            strong view, the code's default) or ``weak_weak``.
    """

    supported_scenarios = ("test_time_adaptation",)
    cache_features = False

    @flat_options
    def __init__(
        self,
        backbone,
        online: AdaptationOptions = AdaptationOptions(optimizer="sgd", lr=0.0002, weight_decay=0.0001, params="all"),
        ema_momentum: Annotated[float, Field(ge=0, le=1)] = 0.999,
        temperature: Annotated[float, Field(gt=0)] = 0.07,
        queue_size: Annotated[int, Field(ge=1)] = 16384,
        num_neighbors: Annotated[int, Field(ge=1)] = 10,
        distance: Literal["cosine", "euclidean"] = "cosine",
        class_aware: bool = True,
        alpha: Annotated[float, Field(ge=0)] = 1.0,
        beta: Annotated[float, Field(ge=0)] = 1.0,
        eta: Annotated[float, Field(ge=0)] = 1.0,
        supervision: Literal["weak_strong", "weak_weak"] = "weak_strong",
    ):
        super().__init__(backbone)
        self.temperature = temperature
        self.class_aware = class_aware
        self.weights = (alpha, beta, eta)
        self.supervision = supervision
        self.adaptation = OnlineAdaptation(online, batch_statistics=False)
        self.teacher = EMATeacher(classifier(backbone, self.head), ema_momentum, buffers="keep")
        self.memory = ContrastiveMemory(backbone.feature_dim, queue_size, num_neighbors, distance)

    def before_experience(self, exp: Experience) -> None:
        super().before_experience(exp)
        if exp.train is None:
            net = classifier(self.backbone, self.head)
            self.adaptation.prepare(self, net, on_start=lambda: self._start(net))

    def _start(self, net) -> None:
        self.teacher.reset(net)
        self.memory.start(self.head.n_classes)

    def adapt(self, x: torch.Tensor) -> torch.Tensor:
        self.adaptation.begin_batch(self)
        weak, strong_q, strong_k = ContrastiveViews(tuple(x.shape[-2:]))(x)
        net, teacher = classifier(self.backbone, self.head), self.teacher.model
        _set_training(net, True)
        _set_training(teacher, True)
        logits_w = self.head(features_w := self.backbone(weak))
        labels = self.memory.pseudo_labels(features_w.detach(), logits_w.detach().softmax(1))
        features_q = self.backbone(strong_q)
        logits_q = self.head(features_q)
        with torch.no_grad():
            self.teacher.update(net)
            keys = F.normalize(teacher[0](strong_k), dim=1)
        logits_ins = self.memory.instance_logits(F.normalize(features_q, dim=1), keys, self.temperature)
        self.memory.enqueue(keys, labels)
        supervised = logits_q if self.supervision == "weak_strong" else logits_w
        alpha, beta, eta = self.weights
        loss = alpha * F.cross_entropy(supervised, labels) + beta * self.memory.instance_loss(logits_ins, labels, self.class_aware)
        if eta > 0:
            mean = supervised.softmax(1).mean(0)
            loss = loss + eta * (mean * torch.log(mean + 1e-8)).sum()
        self.adaptation.step(loss)
        with torch.no_grad():
            features = teacher[0](weak)
            self.memory.update_bank(features, teacher[1](features))
            _set_training(net, False)
            _set_training(teacher, False)
            return net(x)
