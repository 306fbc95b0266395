"""The prompt-pool methods' classifier as a base class: a frozen ViT's prompted features read by a growing linear head.

L2P (Wang et al., CVPR 2022, https://arxiv.org/abs/2112.08654), DualPrompt (Wang et al., ECCV 2022,
https://arxiv.org/abs/2204.04799) and CODA-Prompt (Smith et al., CVPR 2023,
https://arxiv.org/abs/2211.13218) differ in how prompts turn an input into features and in the
prompt loss added to the head's cross-entropy (eq. 5 of L2P: the key-matching term); around that
they train the same way: the head's options
(:class:`~clpeft.components.heads.head_training.HeadOptions`: the class mask, the optional
alignment), the cached frozen feature as the query, one loss ``CE + prompt loss``. A method
subclasses :class:`PromptedClassifier` and defines ``_features``.
"""

from __future__ import annotations

import torch

from clpeft.components.heads.head_training import HeadOptions, HeadTraining
from clpeft.components.prompts.prompted import promptable_width
from clpeft.data import Batch
from clpeft.experience import Experience
from clpeft.strategy import Strategy


class PromptedClassifier(Strategy):
    """A linear head on a frozen ViT's prompted features (base class of the prompt-pool methods).

    Args:
        backbone: a frozen timm ViT (a UserError naming ``method`` for any other backbone).
        method: the registry name, for that error.
        head_options: the head's :class:`~clpeft.components.heads.head_training.HeadOptions`.

    Attributes:
        width: the backbone's token width ``D`` (the prompts' width).
    """

    needs_query = True

    def __init__(self, backbone, method: str, head_options: HeadOptions):
        super().__init__(backbone)
        self.width = promptable_width(backbone, method)
        self.aligned = HeadTraining(backbone.feature_dim, head_options)

    def _features(self, x: torch.Tensor, query: torch.Tensor | None, train: bool) -> tuple[torch.Tensor, torch.Tensor | float]:
        """The prompted features the head reads and the weighted prompt loss added to the cross-entropy.

        ``query`` is the cached frozen feature of ``x`` (``None``: computed); ``train`` says
        whether prompts are chosen for training (at test time they are selected from ``query``).
        """
        raise NotImplementedError

    def _head_features(self, batch: Batch) -> torch.Tensor:
        """The prompted features the head reads, prompts chosen as at test time."""
        return self._features(batch.x, batch.features, train=False)[0]

    def before_experience(self, exp: Experience) -> None:
        self.aligned.start(exp, self.batches, self._head_features)
        super().before_experience(exp)

    def training_step(self, batch: Batch) -> torch.Tensor:
        features, prompt_loss = self._features(batch.x, batch.features, train=True)
        return self.aligned.loss(self.head(features), batch.y) + prompt_loss

    def after_experience(self, exp: Experience) -> None:
        self.aligned.finish(self.head, exp, self.batches, self._head_features)

    def predict(self, x: torch.Tensor, query: torch.Tensor | None = None) -> torch.Tensor:
        """Logits over the classes seen so far; ``query`` is the cached frozen feature of ``x``."""
        return self.aligned(self._features(x, query, train=False)[0], self.head)
