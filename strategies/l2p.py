"""Learning to Prompt (L2P).

Wang et al., "Learning to Prompt for Continual Learning", CVPR 2022
(https://arxiv.org/abs/2112.08654). A frozen ViT is instructed by prompts drawn from a pool
(:class:`~clpeft.components.prompts.prompt_pool.PromptPool`): the ``N`` prompts whose keys are nearest
(cosine) to the query ``q(x)`` -- the frozen model's [CLS] feature, taken from the feature cache
-- are prepended to the patch tokens, and the classifier reads the mean of the prompt tokens
after the last block (the official ``head_type='prompt'``). The loss is eq. 5::

    L = CE(f(x_p), y) + lambda * sum_{s_i in K_x} gamma(q(x), k_{s_i}),   gamma = 1 - cos

with the cross-entropy over the current experience's classes (the official ``train_mask``).
As in the official port (JH-LEE-KR/l2p-pytorch) the prompt tokens carry the frozen [CLS]
position embedding (``prompt_position: cls``); the official code subtracts
``lambda * sum cos`` instead of adding ``lambda * sum (1 - cos)``: the loss is ``lambda * N``
higher here, the gradients are the same (``tests/reference/test_l2p.py``).

**Batch-wise selection leaks task identity at test time.** With ``batchwise_selection`` (the
official ``batchwise_prompt``) the ``N`` prompts chosen most often in a batch serve all of its
samples. Test batches hold one experience's images (each experience is scored on its own), so
the majority vote pools evidence from same-task images: a sample's prediction depends on its
batch mates, and larger test batches help more. The published configs keep it, with the official
evaluation batch size (16); everything else selects per sample (the default).

Paper symbols -> parameters: ``M`` -> ``pool_size``, ``L_p`` -> ``prompt_length``,
``N`` -> ``top_k``, ``lambda`` -> ``matching_weight``.
"""

from typing import Annotated, Literal

import torch
from pydantic import Field

from clpeft.backbones.vit import class_token_position
from clpeft.components.heads.head_training import HeadOptions
from clpeft.components.prompts.prompt_pool import PromptPool
from clpeft.components.prompts.prompted import query_of
from clpeft.components.prompts.prompted_classifier import PromptedClassifier
from clpeft.errors import UserError
from clpeft.experience import Experience
from clpeft.registry import register_strategy
from clpeft.schema import flat_options


@register_strategy("l2p")
class L2P(PromptedClassifier):
    """L2P: a key-matched prompt pool instructs a frozen ViT (Wang et al. 2022).

    Args:
        backbone: a frozen timm ViT.
        pool_size: ``M``, prompts in the pool.
        prompt_length: ``L_p``, tokens per prompt (0: the plain frozen backbone and a linear head).
        top_k: ``N``, prompts selected per input.
        matching_weight: ``lambda``, weight of the key-matching loss.
        batchwise_selection: use the ``N`` prompts chosen most often in the batch for all its
            samples (the official ``batchwise_prompt``; at test time it shares task evidence
            across the single-experience test batch, see the module docstring).
        prompt_position: position embedding of the prompt tokens: ``cls``, the class token's
            (official code), or ``none``.
        diversity: weight training-time prompt selection by past prompt frequencies (eq. 4).
        head_options: flat keys ``train_mask`` (the official code's), ``align`` and
            ``drift_compensation`` (additions to the paper): :class:`~clpeft.components.heads.HeadOptions`.
    """

    @flat_options
    def __init__(
        self,
        backbone,
        pool_size: Annotated[int, Field(ge=1)] = 10,
        prompt_length: Annotated[int, Field(ge=0)] = 5,
        top_k: Annotated[int, Field(ge=1)] = 5,
        matching_weight: Annotated[float, Field(ge=0)] = 0.1,
        batchwise_selection: bool = False,
        prompt_position: Literal["cls", "none"] = "cls",
        diversity: bool = False,
        head_options: HeadOptions = HeadOptions(),
    ):
        self.check_config({"pool_size": pool_size, "top_k": top_k})
        super().__init__(backbone, "l2p", head_options)
        self.prompt_pool = PromptPool(pool_size, prompt_length, self.width, top_k, backbone.feature_dim, batchwise_selection, diversity)
        self.matching_weight = matching_weight
        if prompt_position == "cls":
            try:
                class_token_position(backbone.net)
            except ValueError as error:
                raise UserError(f"{error}; set prompt_position: none", key="strategy.prompt_position") from None
        self.prompt_position = prompt_position

    @classmethod
    def check_config(cls, params: dict) -> None:
        if params["top_k"] > params["pool_size"]:
            raise UserError(f"cannot select {params['top_k']} prompts from a pool of {params['pool_size']}", key="strategy.top_k")

    def before_experience(self, exp: Experience) -> None:
        super().before_experience(exp)
        self.prompt_pool.start_task()

    def _features(self, x: torch.Tensor, query: torch.Tensor | None, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """The prompted features the head reads, and ``lambda`` times the key-matching loss."""
        selection = self.prompt_pool(query_of(self.backbone, x, query), train=train)
        pool = "prompt_mean" if selection.prompts.shape[1] else "default"
        features = self.backbone.forward_prompted(x, prompts=selection.prompts, pool=pool, prompt_position=self.prompt_position)
        return features, self.matching_weight * selection.matching_loss
