"""OVOR: OnePrompt with Virtual Outlier Regularisation.

Huang, Chen & Hsu, "OVOR: OnePrompt with Virtual Outlier Regularization for Rehearsal-Free
Class-Incremental Learning", ICLR 2024 (https://openreview.net/forum?id=FbuyDzZTPt; code:
jpmorganchase/ovor, built on CODA-Prompt's). Two parts:

1. **OnePrompt** (Sec. 3.1, :class:`~clpeft.components.prompts.one_prompt.OnePrompt`): one
   G-prompt (layers 0-1) and one E-prompt (layers 2-4) used by prefix tuning for every input and
   every task; no pool, no keys, no query pass. Prompts and the linear head are trained with the
   cross-entropy over the current experience's classes (the official ``train_mask``).
2. **Virtual outlier regularisation** (Sec. 3.2, eq. 4-5,
   :mod:`~clpeft.components.heads.virtual_outliers`): after ``regular_epochs`` epochs of an
   experience, each remaining epoch trains the head alone on the experience's features, with
   outliers synthesised around them and the energy margin loss::

       L = CE(f(h), y) + lambda * (H(max(0, E(h) - tau_id)) + H(max(0, tau_ood - E(v))))

The official run is ``epochs: [0, E1, E2]`` (``E1 + E2`` = ``train.epochs``, ``E1`` =
``regular_epochs``), Adam at 0.001 with CODA-Prompt's per-epoch quarter-cosine over all
``E1 + E2`` epochs (``train.schedule: quarter_cosine``), one optimizer for both phases.

Costs: one backbone pass per regular step (the official code too: its query is a zero tensor).
The regularised epochs need the features of the experience: the official code makes a pass over
the (augmented) training data at the start of every such epoch; here one pass over the
unaugmented data at the first of them serves them all, since the prompts no longer move
(strategy passes see no augmentation). Each epoch draws new outliers, as the official code does.
Stored: ``(2 L_g + 3 L_e) D`` prompt values, no pool.

Differences from the official code: the features for the regularisation are unaugmented (above);
its ID batches have their own size (``id_bsz``, 128, the published batch size), here the
engine's ``train.batch_size``; its warm-up epochs (``epochs[0]``, 0 in every published run) are
not offered; ``outliers_around: boundary`` offers the paper's synthesis around boundary features,
which the official code computes but never adds (the default, ``origin``, is its behaviour).

Paper symbols -> parameters: ``L_g``, ``L_e`` -> ``g_length``, ``e_length``; ``lambda`` ->
``outlier_weight``; ``tau_id``, ``tau_ood`` -> ``id_energy_threshold``,
``outlier_energy_threshold``; the official ``cov``, ``K``, ``sample_from``, ``select``,
``num_per_class`` -> ``outlier_scale``, ``neighbours``, ``offsets``, ``boundary_points``,
``outliers_per_class``.
"""

from __future__ import annotations

import warnings
from typing import Annotated

import torch
from pydantic import Field

from clpeft.components.heads.head_training import HeadOptions, HeadTraining
from clpeft.components.heads.virtual_outliers import Around, OutlierBatches, energy_margin_loss, synthesize_outliers
from clpeft.components.prompts.one_prompt import OnePrompt
from clpeft.components.prompts.prompted import check_layers, promptable_width
from clpeft.data import Batch
from clpeft.distributed import launched_size
from clpeft.errors import UserError
from clpeft.experience import Experience
from clpeft.registry import register_strategy
from clpeft.schema import flat_options
from clpeft.strategy import Strategy


@register_strategy("ovor")
class OVOR(Strategy):
    """OVOR: one shared prefix prompt, the head regularised by virtual outliers (Huang et al. 2024).

    Args:
        backbone: a frozen timm ViT.
        g_length: ``L_g``, G-prompt length, prefix keys and values together (even).
        e_length: ``L_e``, E-prompt length, prefix keys and values together (even).
        g_layers: layers with the G-prompt.
        e_layers: layers with the E-prompt.
        regular_epochs: ``E1``, epochs per experience that train prompts and head; the later ones
            train the head with the regularisation (``train.epochs`` must exceed it; a warning says
            when an experience had no such epoch). ``None``: no regularisation (OnePrompt alone).
        outlier_weight: ``lambda``.
        id_energy_threshold: ``tau_id``, the energy the task's features should stay below.
        outlier_energy_threshold: ``tau_ood``, the energy outliers should stay above.
        outlier_scale: ``sigma``, the factor on the Gaussian offsets.
        neighbours: ``K``, the neighbour whose distance ranks features and candidates.
        offsets: Gaussian offsets drawn per regularised epoch.
        boundary_points: boundary features selected.
        outliers_per_class: outliers kept per class of the experience.
        outliers_around: ``origin`` (the official code) or ``boundary`` (the paper).
        huber: the Huber penalty (``False``: squared error).
        head_options: flat keys ``train_mask``, ``align``, ``drift_compensation``: :class:`HeadOptions`.
    """

    supported_scenarios = ("class_incremental",)
    cache_features = False  # the prompted backbone reads raw inputs

    @flat_options
    def __init__(
        self,
        backbone,
        g_length: Annotated[int, Field(ge=2, multiple_of=2)] = 10,
        e_length: Annotated[int, Field(ge=2, multiple_of=2)] = 40,
        g_layers: list[Annotated[int, Field(ge=0)]] = [0, 1],
        e_layers: list[Annotated[int, Field(ge=0)]] = [2, 3, 4],
        regular_epochs: Annotated[int, Field(ge=1)] | None = 16,
        outlier_weight: Annotated[float, Field(ge=0)] = 0.1,
        id_energy_threshold: float = -15.0,
        outlier_energy_threshold: float = -3.0,
        outlier_scale: Annotated[float, Field(gt=0)] = 0.1,
        neighbours: Annotated[int, Field(ge=1)] = 50,
        offsets: Annotated[int, Field(ge=1)] = 600,
        boundary_points: Annotated[int, Field(ge=1)] = 50,
        outliers_per_class: Annotated[int, Field(ge=1)] = 40,
        outliers_around: Around = "origin",
        huber: bool = True,
        head_options: HeadOptions = HeadOptions(),
    ):
        self.check_config({"g_layers": g_layers, "e_layers": e_layers})
        if regular_epochs is not None and launched_size() > 1:
            raise UserError(
                "ovor's outlier epochs run in one process (each rank would synthesise its own outliers); "
                "start it without torchrun or set strategy.regular_epochs: null",
                key="strategy.regular_epochs",
            )
        super().__init__(backbone)
        width = promptable_width(backbone, "ovor")
        check_layers(backbone, g_layers + e_layers, "strategy.e_layers")
        self.prompt = OnePrompt(width, g_layers, e_layers, g_length, e_length)
        self.aligned = HeadTraining(backbone.feature_dim, head_options)
        self.regular_epochs = regular_epochs
        self.outlier_weight, self.huber, self.around = outlier_weight, huber, outliers_around
        self.thresholds = (id_energy_threshold, outlier_energy_threshold)
        self.synthesis = {"k": neighbours, "select": boundary_points, "scale": outlier_scale}
        self.n_offsets, self.per_class = offsets, outliers_per_class
        self._features: tuple[torch.Tensor, torch.Tensor] | None = None
        self._outliers: OutlierBatches | None = None

    @classmethod
    def check_config(cls, params: dict) -> None:
        both = sorted(set(params.get("g_layers", [0, 1])) & set(params.get("e_layers", [2, 3, 4])))
        if both:
            raise UserError(f"layers {both} have both prompts; give G- and E-prompts disjoint layers", key="strategy.e_layers")

    def _prompted(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone.forward_prompted(x, prefixes=self.prompt())

    def _head_features(self, batch: Batch) -> torch.Tensor:
        return self._prompted(batch.x)

    def _regularising(self) -> bool:
        return self.regular_epochs is not None and self.epoch >= self.regular_epochs

    def before_experience(self, exp: Experience) -> None:
        self.aligned.start(exp, self.batches, self._head_features)
        super().before_experience(exp)
        self._features = None

    @torch.no_grad()
    def before_epoch(self, exp: Experience, epoch: int) -> None:
        if not self._regularising():
            return
        if self._features is None:  # the prompts are fixed from here on: one pass serves every epoch
            pairs = [(self._prompted(batch.x), batch.y) for batch in self.batches(exp.train)]
            self._features = (torch.cat([f for f, _ in pairs]), torch.cat([y for _, y in pairs]))
        features, labels = self._features
        n_classes = len(exp.classes_in_this_experience)
        offsets = torch.randn(self.n_offsets, features.shape[1])
        outliers = synthesize_outliers(features, offsets, self.per_class * n_classes, around=self.around, **self.synthesis)
        self._outliers = OutlierBatches(features, labels, outliers)

    def training_step(self, batch: Batch) -> torch.Tensor:
        if not self._regularising():
            return self.aligned.loss(self.head(self._prompted(batch.x)), batch.y)
        features, labels, outliers = self._outliers.next(len(batch.y))
        logits = self.head(features.to(self.head.weight.dtype))
        classes = self.aligned.mask.classes
        outlier_logits = self.head(outliers.to(self.head.weight.dtype))[:, classes]
        margin = energy_margin_loss(logits[:, classes], outlier_logits, *self.thresholds, huber=self.huber)
        return self.aligned.loss(logits, labels) + self.outlier_weight * margin

    def after_experience(self, exp: Experience) -> None:
        if self.regular_epochs is not None and not self._regularising():  # a warning: `clpeft bench` stops early on purpose
            warnings.warn(
                f"ovor: experience {exp.index} ended after {self.epoch + 1} epoch(s), before strategy.regular_epochs "
                f"({self.regular_epochs}): no outlier epoch ran; raise train.epochs or lower regular_epochs (null: none)",
                stacklevel=2,
            )
        self._features = self._outliers = None
        self.aligned.finish(self.head, exp, self.batches, self._head_features)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Logits over the classes seen so far, from the prompted [CLS] feature."""
        return self.aligned(self._prompted(x), self.head)
