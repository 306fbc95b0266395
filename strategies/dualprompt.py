"""DualPrompt.

Wang et al., "DualPrompt: Complementary Prompting for Rehearsal-free Continual Learning",
ECCV 2022 (https://arxiv.org/abs/2204.04799). A frozen ViT gets two kinds of prefix prompts
(:class:`~clpeft.components.prompts.prefix_prompt.PrefixPrompt`): a task-shared G-prompt at the early
layers ``start_g..end_g`` and a task-specific E-prompt at the layers ``start_e..end_e``. Training
on task ``t`` uses E-prompt ``e_t`` and pulls its key towards the query ``q(x)`` (the frozen
model's [CLS] feature, taken from the feature cache); at test time the E-prompt with the
nearest key is used. The loss is eq. 4::

    L = CE(f(x; g, e_t), y) + lambda * gamma(q(x), k_t),   gamma = 1 - cos

with the cross-entropy over the current experience's classes (the official ``train_mask``);
the classifier reads the [CLS] token (``head_type='token'``). As in the official code a new
task's E-prompt starts as a copy of the previous one (``shared_prompt_pool``). The official code
subtracts ``lambda * cos`` instead of adding ``lambda * (1 - cos)``: the loss is ``lambda``
higher here, the gradients are the same (``tests/reference/test_dualprompt.py``).

Two deliberate differences from the official port (JH-LEE-KR/dualprompt-pytorch):

* its E-prompt lookup reshapes ``(layers, key/value, B, ...)`` to ``(layers, B, key/value, ...)``
  without permuting, so within a batch of ``B`` the first half of the samples get the key prefix
  as both keys and values and the second half the value prefix, and with per-sample selection a
  sample attends to other samples' E-prompts (dualprompt-pytorch issue #8, mammoth issues #56,
  #65). clpeft gives every sample its own E-prompt's keys and values, as the paper describes;
* at test time it chooses among all ``pool_size`` keys, untrained ones included; clpeft among the
  keys of the tasks trained so far (see :class:`~clpeft.components.prompts.prefix_prompt.PrefixPrompt`).

**Batch-wise selection leaks task identity at test time.** With ``batchwise_selection`` (the
official CIFAR-100 ``batchwise_prompt``) the E-prompt chosen most often in a test batch serves
all of it; test batches hold one experience's images, so the vote pools task evidence across the
batch. The published CIFAR-100 config keeps it with the official evaluation batch size (24);
everything else selects per sample (the default).

Paper symbols -> parameters: ``L_g`` -> ``g_length``, ``start_g..end_g`` -> ``g_layers``,
``L_e`` -> ``e_length``, ``start_e..end_e`` -> ``e_layers``, ``M`` (E-prompts) -> ``pool_size``,
``lambda`` -> ``matching_weight``.
"""

from typing import Annotated

import torch
from pydantic import Field

from clpeft.components.heads.head_training import HeadOptions
from clpeft.components.prompts.prefix_prompt import PrefixPrompt
from clpeft.components.prompts.prompted import check_layers, query_of
from clpeft.components.prompts.prompted_classifier import PromptedClassifier
from clpeft.errors import UserError
from clpeft.experience import Experience
from clpeft.registry import register_strategy
from clpeft.schema import flat_options


@register_strategy("dualprompt")
class DualPrompt(PromptedClassifier):
    """DualPrompt: shared G-prompt plus key-selected task E-prompts as prefixes of a frozen ViT (Wang et al. 2022).

    Args:
        backbone: a frozen timm ViT.
        pool_size: number of E-prompts: the most experiences the stream may have.
        g_length: ``L_g``, G-prompt length (0: no G-prompt).
        g_layers: layers that get the G-prompt.
        e_length: ``L_e``, E-prompt length (0: no E-prompt).
        e_layers: layers that get the E-prompt.
        matching_weight: ``lambda``, weight of the key-matching loss.
        batchwise_selection: at test time, use the E-prompt chosen most often in the batch for
            all its samples (the official CIFAR-100 ``batchwise_prompt``; it shares task evidence
            across the single-experience test batch, see the module docstring).
        copy_previous: start each task's E-prompt from the previous task's.
        head_options: flat keys ``train_mask`` (the official code's), ``align`` (classifier
            alignment on DualPrompt, as HiDe-Prompt builds on) and ``drift_compensation``:
            :class:`~clpeft.components.heads.HeadOptions`.
    """

    @flat_options
    def __init__(
        self,
        backbone,
        pool_size: Annotated[int, Field(ge=1)] = 10,
        g_length: Annotated[int, Field(ge=0)] = 5,
        g_layers: list[Annotated[int, Field(ge=0)]] = [0, 1],
        e_length: Annotated[int, Field(ge=0)] = 5,
        e_layers: list[Annotated[int, Field(ge=0)]] = [2, 3, 4],
        matching_weight: Annotated[float, Field(ge=0)] = 1.0,
        batchwise_selection: bool = False,
        copy_previous: bool = True,
        head_options: HeadOptions = HeadOptions(),
    ):
        self.check_config({"g_layers": g_layers, "e_layers": e_layers})
        super().__init__(backbone, "dualprompt", head_options)
        check_layers(backbone, g_layers, "strategy.g_layers")
        check_layers(backbone, e_layers, "strategy.e_layers")
        self.prompt_prefix = PrefixPrompt(
            self.width, pool_size, g_layers, e_layers, g_length, e_length, backbone.feature_dim, batchwise_selection
        )
        self.matching_weight = matching_weight
        self.copy_previous = copy_previous
        self.task = 0

    @classmethod
    def check_config(cls, params: dict) -> None:
        shared = sorted(set(params["g_layers"]) & set(params["e_layers"]))
        if shared:
            raise UserError(f"layers {shared} would get both prompts; G- and E-prompt layers must differ", key="strategy.e_layers")

    def before_experience(self, exp: Experience) -> None:
        super().before_experience(exp)
        if exp.index >= self.prompt_prefix.pool_size:
            raise UserError(
                f"experience {exp.index + 1} needs its own E-prompt but the pool holds "
                f"{self.prompt_prefix.pool_size}; set it to the number of experiences",
                key="strategy.pool_size",
            )
        self.task = exp.index
        self.prompt_prefix.start_task(exp.index, self.copy_previous)

    def _features(self, x: torch.Tensor, query: torch.Tensor | None, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """The prefixed features the head reads and ``lambda`` times the matching loss: the current
        task's E-prompt in training, else the key-selected one."""
        selection = self.prompt_prefix(query_of(self.backbone, x, query), self.task if train else None)
        return self.backbone.forward_prompted(x, prefixes=selection.prefixes), self.matching_weight * selection.matching_loss
