"""CODA-Prompt.

Smith et al., "CODA-Prompt: COntinual Decomposed Attention-based Prompting for Rehearsal-Free
Continual Learning", CVPR 2023 (https://arxiv.org/abs/2211.13218). Instead of selecting prompts,
each prompted layer of a frozen ViT gets a prompt assembled from components
(:class:`~clpeft.components.prompts.attention_prompt_pool.AttentionPromptPool`), weighted by the cosine
between the attended query and each component's key (eqs. 3-5)::

    alpha_m = cos(q(x) * A_m, K_m),   p = sum_m alpha_m P_m

where ``q(x)`` is the frozen model's [CLS] feature (from the feature cache), and ``p`` is used by
prefix-tuning (first half keys, second half values). Everything is trained end to end by the
cross-entropy over the current experience's classes, plus the optional orthogonality
regulariser (eq. 6)::

    L = CE(f(x; p), y) + mu * sum_{B in {P, K, A}} mean((B B^T - I)^2)

Each experience adds ``M / T`` components, initialised orthonormal to all earlier ones, and
freezes those of earlier experiences. The classifier reads the [CLS] token. Defaults follow the
official code (GT-RIPL/CODA-Prompt): ``M = 100`` components over 10 tasks, ``L_p = 8``, layers
0-4, ``mu = 0`` (its run scripts' setting).

Paper symbols -> parameters: ``M / T`` -> ``components_per_task``, ``L_p`` -> ``prompt_length``,
``mu`` (the orthogonality weight) -> ``ortho_weight``.
"""

from typing import Annotated

import torch
from pydantic import Field

from clpeft.components.heads.head_training import HeadOptions
from clpeft.components.prompts.attention_prompt_pool import AttentionPromptPool
from clpeft.components.prompts.prompted import check_layers, query_of
from clpeft.components.prompts.prompted_classifier import PromptedClassifier
from clpeft.errors import UserError
from clpeft.experience import Experience
from clpeft.registry import register_strategy
from clpeft.schema import flat_options


@register_strategy("coda_prompt")
class CodaPrompt(PromptedClassifier):
    """CODA-Prompt: attention-weighted sums of prompt components, grown per task (Smith et al. 2023).

    Args:
        backbone: a frozen timm ViT.
        components_per_task: ``M / T``, components added for each experience.
        prompt_length: ``L_p``, even: ``L_p / 2`` prefix keys and ``L_p / 2`` prefix values.
        layers: the prompted layers.
        ortho_weight: ``mu``, weight of the orthogonality regulariser.
        head_options: flat keys ``train_mask`` (the official code masks the earlier tasks' classes:
            the same set), ``align`` and ``drift_compensation``: :class:`~clpeft.components.heads.HeadOptions`.
    """

    @flat_options
    def __init__(
        self,
        backbone,
        components_per_task: Annotated[int, Field(ge=1)] = 10,
        prompt_length: Annotated[int, Field(ge=2)] = 8,
        layers: list[Annotated[int, Field(ge=0)]] = [0, 1, 2, 3, 4],
        ortho_weight: Annotated[float, Field(ge=0)] = 0.0,
        head_options: HeadOptions = HeadOptions(),
    ):
        self.check_config({"prompt_length": prompt_length})
        super().__init__(backbone, "coda_prompt", head_options)
        check_layers(backbone, layers, "strategy.layers")
        self.prompt_components = AttentionPromptPool(layers, self.width, prompt_length, components_per_task, backbone.feature_dim)
        self.ortho_weight = ortho_weight

    @classmethod
    def check_config(cls, params: dict) -> None:
        if params["prompt_length"] % 2:
            raise UserError(
                f"must be even (half prefix keys, half prefix values), got {params['prompt_length']}", key="strategy.prompt_length"
            )

    def before_experience(self, exp: Experience) -> None:
        super().before_experience(exp)
        try:
            self.prompt_components.add_task()
        except ValueError as err:
            raise UserError(
                f"{err}; lower it so that experiences x components fit the feature width", key="strategy.components_per_task"
            ) from None

    def _features(self, x: torch.Tensor, query: torch.Tensor | None, train: bool) -> tuple[torch.Tensor, torch.Tensor | float]:
        """The prefixed features the head reads (the plain frozen backbone's before the first
        experience) and, in training, ``mu`` times the orthogonality loss."""
        if not len(self.prompt_components.tasks):
            features = self.backbone(x)
        else:
            features = self.backbone.forward_prompted(x, prefixes=self.prompt_components(query_of(self.backbone, x, query)))
        if train and self.ortho_weight > 0:
            return features, self.ortho_weight * self.prompt_components.orthogonality_loss()
        return features, 0.0
