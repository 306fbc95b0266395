"""LAE: Learning, Accumulation and Ensemble with a parameter-efficient tuning module.

Gao et al., "A Unified Continual Learning Framework with General Parameter-Efficient Tuning",
ICCV 2023 (https://arxiv.org/abs/2303.10070; code: github.com/gqk/LAE). The frozen backbone
carries a PET module, here LoRA on the target linears. The official LoRA variant (``KVLoRA``)
adapts the key and value projections of blocks 0-4, each with its own rank-5 ``B A`` and a
learnable output scale starting at 1: with ``backbone.split_qkv`` that is
``targets: [blocks.0.attn.qkv.k, blocks.0.attn.qkv.v, ..., blocks.4.attn.qkv.v]``, ``alpha = rank``
and ``learnable_scale: true`` (``configs/lae/``; ``tests/reference/test_lae.py`` runs the official
module beside this one):

* **Learning** -- the *online* module ``theta_on`` and the head train on each experience with the
  cross-entropy restricted to the experience's classes (the official ``output[:, n_old:]``); new
  head rows start as the official ``SimpleHead.weights_init`` sets them, ``N(0, 0.001^2)`` weights
  and zero biases.
  Adaptation-speed calibration: from the second experience on, the online module is frozen for
  the first ``freeze_epochs`` epochs, so the new head rows catch up before the module moves
  (``num_freeze_epochs`` in the official code).
* **Accumulation** -- after the first experience the *offline* module starts as a copy of the
  online one; after every later optimizer step it follows it by an exponential moving average
  (:class:`~clpeft.components.regularization.ema.EMATeacher`)::

      theta_off <- m * theta_off + (1 - m) * theta_on          (m -> ema_momentum)

* **Ensemble** -- at inference both experts run with the shared head and the prediction is the
  class-wise maximum of their softmax outputs, ``max(softmax(f_on(x)), softmax(f_off(x)))``
  (the official ``eval_epoch``); ``predict`` returns its logarithm.

The EMA update follows every optimizer step (``after_training_step``, the official
``post_train_step``), the frozen first epochs included.

``align`` (an addition to the paper) gives each expert its own aligned copy of the shared head,
re-trained on sampled class-Gaussian features of that expert after every experience
(:class:`~clpeft.components.heads.alignment.AlignedHead`, SLCA's alignment), optionally with
drift compensation of the stored means; the ensemble then takes the maximum over the aligned
heads' softmax outputs.

Paper symbols -> parameters: EMA momentum ``alpha`` -> ``ema_momentum``; LoRA rank ``r`` -> ``rank``;
the official ``num_freeze_epochs`` -> ``freeze_epochs``, ``pet_kwargs.scale: null`` -> ``learnable_scale: true``.
"""

from typing import Annotated, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch.func import functional_call

from clpeft.components.heads.head_training import HeadOptions, HeadTraining
from clpeft.components.lora import LoRAFactors, inject_lora
from clpeft.components.lora.kinds import AdapterKind, check_adapter
from clpeft.components.regularization.ema import EMATeacher
from clpeft.data import Batch
from clpeft.experience import Experience
from clpeft.registry import register_strategy
from clpeft.schema import flat_options
from clpeft.strategy import Strategy


@register_strategy("lae")
class LAE(Strategy):
    """LAE: online LoRA, offline EMA copy, max-softmax ensemble of the two (Gao et al. 2023).

    Args:
        backbone: a backbone with ``nn.Linear`` layers (timm ViT, text encoder, MLP).
        targets: module-name suffixes of the adapted linears.
        rank: LoRA rank ``r`` (5 in the paper).
        alpha: LoRA ``alpha``; the fixed scaling is ``alpha / rank`` (1 in the official code).
        learnable_scale: multiply each adapted layer's update by a trained scalar, starting at 1
            (the official ``KVLoRA``'s ``Scaler``), kept in the EMA like the factors.
        ema_momentum: ``m`` of the offline module's EMA (0.9999 in the official configs).
        freeze_epochs: epochs at the start of every experience after the first in which the
            online module is frozen and only the head trains.
        ensemble: ``max`` (the paper), or one expert alone: ``online`` or ``offline``.
        adapter: the adapter kind: ``lora``, ``dora``, ``pissa``, ``vera``, ``lora_xs`` or
            ``adalora`` (:mod:`clpeft.components.lora.kinds`; ``vera``, ``lora_xs`` and ``adalora``
            need ``learnable_scale: false``); the EMA covers each kind's trained tensors.
        head_options: the classifier-side options, written as the flat keys ``train_mask``,
            ``align`` (one aligned copy of the head per expert) and ``drift_compensation``
            (:class:`~clpeft.components.heads.HeadOptions`).
    """

    cache_features = False  # the online module changes the backbone's output

    @flat_options
    def __init__(
        self,
        backbone,
        targets: list[str] = ["qkv"],
        rank: Annotated[int, Field(ge=1)] = 5,
        alpha: Annotated[float, Field(gt=0)] = 5.0,
        learnable_scale: bool = True,
        ema_momentum: Annotated[float, Field(ge=0, le=1)] = 0.9999,
        freeze_epochs: Annotated[int, Field(ge=0)] = 3,
        ensemble: Literal["max", "online", "offline"] = "max",
        adapter: AdapterKind = "lora",
        head_options: HeadOptions = HeadOptions(),
    ):
        check_adapter(adapter, learnable_scale=learnable_scale, key="strategy.adapter")
        super().__init__(backbone)
        self.lora = inject_lora(backbone, targets, rank, alpha, learnable_scale=learnable_scale, kind=adapter, key="strategy.targets")
        self.offline = EMATeacher(LoRAFactors(self.lora), ema_momentum)
        self.register_buffer("has_offline", torch.zeros((), dtype=torch.bool))
        self.freeze_epochs = freeze_epochs
        self.ensemble = ensemble
        self.aligned_online = HeadTraining(backbone.feature_dim, head_options)  # its mask trains the shared head
        self.aligned_offline = HeadTraining(backbone.feature_dim, head_options)

    def _offline_features(self, x: torch.Tensor) -> torch.Tensor:
        return functional_call(self.backbone, self.offline.model.overrides(), (x,))

    def _online_head_features(self, batch: Batch) -> torch.Tensor:
        return self.backbone(batch.x)

    def _offline_head_features(self, batch: Batch) -> torch.Tensor:
        return self._offline_features(batch.x)

    def before_experience(self, exp: Experience) -> None:
        self.aligned_online.start(exp, self.batches, self._online_head_features)
        self.aligned_offline.start(exp, self.batches, self._offline_head_features)
        known = self.head.n_classes
        super().before_experience(exp)
        with torch.no_grad():  # the official SimpleHead.weights_init of the new classifier
            torch.nn.init.normal_(self.head.weight[known:], std=0.001)
            self.head.bias[known:].zero_()

    def param_groups(self, lr: float) -> list[dict]:
        # the online factors are listed even while frozen for the first epochs
        return [{"params": [*LoRAFactors(self.lora).parameters(), *self.head.parameters()], "lr": lr}]

    def training_step(self, batch: Batch) -> torch.Tensor:
        for p in LoRAFactors(self.lora).parameters():  # frozen for the first epochs of later experiences
            p.requires_grad_(not bool(self.has_offline) or self.epoch >= self.freeze_epochs)
        return self.aligned_online.loss(self.head(self.backbone(batch.x)), batch.y)

    def after_training_step(self) -> bool:
        """Accumulation: the offline module's EMA step towards the online one (from the second experience on)."""
        if bool(self.has_offline):
            self.offline.update(LoRAFactors(self.lora))
        return False

    def after_experience(self, exp: Experience) -> None:
        online = LoRAFactors(self.lora)
        for p in online.parameters():
            p.requires_grad_(True)
        if not bool(self.has_offline):
            self.offline.reset(online)  # Accumulation starts from the first experience's module
            self.has_offline.fill_(True)
        self.aligned_online.finish(self.head, exp, self.batches, self._online_head_features)
        self.aligned_offline.finish(self.head, exp, self.batches, self._offline_head_features)

    def predict(self, x: torch.Tensor) -> torch.Tensor:
        """Log of the class-wise maximum of the two experts' softmax outputs."""
        use_offline = bool(self.has_offline) and self.ensemble != "online"
        if not use_offline:
            return self.aligned_online(self.backbone(x), self.head)
        offline = self.aligned_offline(self._offline_features(x), self.head)
        if self.ensemble == "offline":
            return offline
        online = self.aligned_online(self.backbone(x), self.head)
        return torch.maximum(F.softmax(online, dim=1), F.softmax(offline, dim=1)).log()
