"""Few-shot class-incremental learning with a frozen backbone and prototypes.

The "strong base training, then frozen features and class prototypes" recipe that Zhang et al.,
"Few-Shot Incremental Learning with Continually Evolved Classifiers", CVPR 2021
(https://arxiv.org/abs/2104.03047, the decoupled baseline) and Zhou et al., "Forward Compatible
Few-Shot Class-Incremental Learning", CVPR 2022 (https://arxiv.org/abs/2203.06953) build on:

1. session 0 (the base classes, all their data): the backbone and a cosine classifier
   ``logit_c = s * cos(phi(x), w_c)`` (weights ``w_c`` without bias, ``s`` fixed) train with
   cross-entropy in the engine's normal loop -- CEC's decoupled-cosine baseline, ``-project base
   -base_mode ft_cos`` (``MYNET.forward_metric`` in its ``models/base/Network.py``);
2. after it the backbone is frozen and every class ``c`` is represented by its prototype, the
   mean feature ``mu_c = 1/|D_c| sum_{x in D_c} phi(x)`` (base classes from their full data, as
   CEC's ``replace_base_fc``; each novel class from its ``k`` shots, as ``update_fc_avg``; no
   training in later sessions: ``-new_mode avg_cos``);
3. prediction is the cosine classifier ``logit_c = s * cos(phi(x), mu_c)``.

``base_head: linear`` trains the base session with a linear head (with bias) instead. CEC keeps
the base-session epoch with the best *test* accuracy; clpeft keeps the last epoch (no model
selection on the test set).

Paper symbols: ``s`` (CEC's ``temperature``, 16) -> ``scale``.
"""

from typing import Annotated, Literal

from pydantic import Field

from clpeft.components.heads.class_statistics import ClassStatistics
from clpeft.components.heads.classifiers import CosineHead, LinearHead, PrototypeHead
from clpeft.components.heads.frozen_feature_classifier import FrozenFeatureClassifier
from clpeft.registry import register_strategy


@register_strategy("fscil_proto")
class FSCILPrototypes(FrozenFeatureClassifier):
    """Few-shot CIL: base-session training, then a frozen backbone and cosine class prototypes (Zhang et al. 2021).

    The base session trains the whole backbone with a cosine classifier (first-session adaptation
    of :class:`~clpeft.components.heads.frozen_feature_classifier.FrozenFeatureClassifier`);
    every session then adds the class means of its data to a cosine :class:`~clpeft.components.PrototypeHead`.

    Args:
        backbone: the feature extractor (trainable: it is trained on the base session).
        scale: temperature ``s`` of the cosine logits (CEC's ``-temperature 16``), in training and prediction.
        base_head: the classifier trained with the backbone on the base session: ``cosine``
            (``s * cos``, no bias, CEC's ``ft_cos`` baseline) or ``linear`` (with bias).
    """

    supported_scenarios = ("few_shot_class_incremental",)

    def __init__(self, backbone, scale: Annotated[float, Field(gt=0)] = 16.0, base_head: Literal["cosine", "linear"] = "cosine"):
        dim = backbone.feature_dim
        head = CosineHead(dim, scale=scale, learn_scale=False) if base_head == "cosine" else LinearHead(dim)
        super().__init__(
            backbone,
            PrototypeHead(dim, metric="cosine", scale=scale),
            ClassStatistics(dim, covariance="none"),
            adapt="full",
            adapt_head=head,
        )

    @property
    def prototypes(self):
        """The class means ``mu_c``, one row per class seen."""
        return self.head.prototypes

    def fit_head(self) -> None:
        self.head.fit(self.stats)
