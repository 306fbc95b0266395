"""HiDe-LoRA.

Wang, Xie, Zhang, Su & Zhu, "HiDe-PET: Continual Learning via Hierarchical Decomposition of
Parameter-Efficient Tuning", TPAMI 2025 (https://arxiv.org/abs/2407.05229; code: thu-ml/HiDe-Prompt,
``hidelora``). HiDe-Prompt's hierarchical decomposition (:mod:`clpeft.strategies.hide_prompt`) with
task-specific LoRA in place of the task prompts, on a frozen ViT:

* **within-task prediction (WTP)**: one LoRA per task on the key and value projections of the first
  blocks (:class:`~clpeft.components.lora.task_lora.TaskLoRA`, the official ``HideLoraPool``:
  ``delta W_t = (alpha / r) B_t A_t``, ``alpha = 1``); a new task's LoRA starts as a copy of the
  previous one's, and after the task it becomes ``(1 - m) (A_t, B_t) + m mean_{i<t} (A_i, B_i)``
  (LoRA momentum ``m``). Loss: the cross-entropy over the current task's classes plus the
  contrastive regularisation against the stored centroids (temperature 0.8, weight ``lambda``)::

      L = CE(f(x; theta_t), y) + lambda * CE([C; h_theta(x)] [C; h_theta(x)]^T / 0.8, identity)

* **task-identity inference (TII)**: HiDe-Prompt's classifier on the frozen model's features
  (:class:`~clpeft.components.heads.task_identity.TaskIdentityInference`), trained after each task;
  each test sample gets the LoRA of its predicted class's task;
* **task-adaptive prediction (TAP)**: after each task from the second on, the output layer is
  re-trained on features replayed from every class's k-means cluster Gaussians of the LoRA
  representations (:class:`~clpeft.components.heads.centroid_statistics.CentroidStatistics`).

The three stages around the LoRA are HiDe-Prompt's
(:mod:`clpeft.components.heads.hierarchical_decomposition`).

**Backbone passes.** All tasks' LoRAs sit in one
:class:`~clpeft.components.lora.batched.MultiLoRALinear` per layer: a test batch whose samples are
assigned different tasks takes one backbone pass (the official code too: per-sample ``bmm``).
Outside routing those layers are the frozen ones, so the frozen features come from the feature
cache (``needs_query``): one pass per training step and per test batch, none for TII training
(the official code: two, two and one; ``tests/strategies/test_hide_lora.py`` counts them). The
LoRA factors are trainable only while their task trains; between tasks the whole backbone is frozen.

Differences from the official code, by design: TII is trained inside the same run (the official
code loads the checkpoints of a separate HiDe-Prompt TII run); the output layer covers the classes
seen so far; k-means and replay draw from seeded generators; the LoRA factors get no weight decay
(the official runs use none; decay would move the finished tasks' factors, whose gradients are zero).
``tests/reference/test_hide_lora.py`` checks the rest against the official code.

Paper symbols -> parameters: LoRA rank ``r`` -> ``rank``, LoRA blocks -> ``lora_layers`` (official
``lora_depth``), adapted projections -> ``projections``, LoRA momentum ``m`` -> ``lora_momentum``,
contrastive weight ``lambda`` -> ``contrastive_weight`` (official ``reg``), clusters per class ``K`` ->
``n_centroids``.
"""

from typing import Annotated, Literal

import torch
from pydantic import Field

from clpeft.backbones.split_qkv import split_qkv
from clpeft.components.heads.hierarchical_decomposition import HierarchicalOptions, learn_task_adaptive_prediction, seeded_from_torch
from clpeft.components.heads.hierarchical_strategy import HierarchicalDecomposition
from clpeft.components.lora.task_lora import TaskLoRA
from clpeft.components.prompts.prompted import check_layers, promptable_width
from clpeft.experience import Experience
from clpeft.registry import register_strategy
from clpeft.schema import flat_options


@register_strategy("hide_lora")
class HiDeLoRA(HierarchicalDecomposition):
    """HiDe-LoRA: task LoRAs chosen by a frozen-feature task classifier, heads re-trained on replayed statistics (Wang et al. 2025).

    The experience around the LoRAs is :class:`~clpeft.components.heads.hierarchical_strategy.HierarchicalDecomposition`'s.

    Args:
        backbone: a frozen timm ViT (its fused ``qkv`` projections are split in place).
        pool_size: number of task LoRAs: the most experiences the stream may have.
        rank: ``r``, rank of every LoRA (official ``lora_rank``).
        alpha: LoRA ``alpha``; the scaling is ``alpha / r`` (official ``lora_alpha``, 1).
        lora_layers: the adapted blocks (official: the first ``lora_depth`` = 5).
        projections: the adapted attention projections (official: key and value).
        lora_momentum: ``m``, weight of the earlier LoRAs' mean in a finished task's LoRA (official ``lora_momentum``).
        contrastive_weight: ``lambda``, weight of the contrastive regularisation (official ``reg``).
        hierarchy: flat keys ``train_mask``, ``n_centroids``, ``tap_*`` and ``tii_*`` of the TII and TAP stages
            (:class:`~clpeft.components.heads.hierarchical_decomposition.HierarchicalOptions`).
    """

    what = "LoRA"

    @flat_options
    def __init__(
        self,
        backbone,
        pool_size: Annotated[int, Field(ge=1)] = 10,
        rank: Annotated[int, Field(ge=1)] = 4,
        alpha: Annotated[float, Field(gt=0)] = 1.0,
        lora_layers: list[Annotated[int, Field(ge=0)]] = [0, 1, 2, 3, 4],
        projections: list[Literal["q", "k", "v"]] = ["k", "v"],
        lora_momentum: Annotated[float, Field(ge=0, le=1)] = 0.1,
        contrastive_weight: Annotated[float, Field(ge=0)] = 0.01,
        hierarchy: HierarchicalOptions = HierarchicalOptions(),
    ):
        super().__init__(backbone, "hide_lora")
        promptable_width(backbone, "hide_lora")
        check_layers(backbone, lora_layers, "strategy.lora_layers")
        split_qkv(backbone.net)
        targets = [f"blocks.{i}.attn.qkv.{p}" for i in lora_layers for p in projections]
        self.task_lora = TaskLoRA(backbone.net, targets, pool_size, rank, alpha, key="strategy.projections")
        self.add_stages(hierarchy, lora_momentum, contrastive_weight)

    @property
    def pool(self) -> TaskLoRA:
        return self.task_lora

    def before_experience(self, exp: Experience) -> None:
        """Start the task's LoRA from the previous one's and make the factors trainable."""
        super().before_experience(exp)
        self.task_lora.requires_grad_(True)

    def param_groups(self, lr: float) -> list[dict]:
        """The LoRAs (no weight decay: the finished tasks' factors stay as they are) and the output layer, both at ``lr``."""
        return [{"params": self.task_lora.parameters(), "lr": lr, "weight_decay": 0.0}, {"params": list(self.head.parameters()), "lr": lr}]

    def features(self, x: torch.Tensor, tasks: torch.Tensor | int) -> torch.Tensor:
        """The representations of ``x`` with each sample's task LoRA (``tasks``: one task for all, or ``(B,)``)."""
        ids = torch.full((len(x),), tasks, dtype=torch.long) if isinstance(tasks, int) else tasks
        with self.task_lora.routed(ids):
            return self.backbone(x)

    def after_experience(self, exp: Experience) -> None:
        """Freeze the factors, then TII, the LoRA momentum and TAP."""
        self.task_lora.requires_grad_(False)
        self.learn_stages(exp, seeded_from_torch, learn_task_adaptive_prediction)
