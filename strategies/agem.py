"""Averaged Gradient Episodic Memory (A-GEM).

Chaudhry et al., "Efficient Lifelong Learning with A-GEM", ICLR 2019
(https://arxiv.org/abs/1812.00420), eq. 11: with ``g`` the gradient of the incoming batch's loss
and ``g_ref`` that of a batch drawn from the episodic memory of past experiences, the step uses
``g`` when ``g . g_ref >= 0`` and otherwise ``g - (g . g_ref / g_ref . g_ref) g_ref``, the closest
gradient that does not increase the memory's loss to first order. The projection runs in
``after_backward`` over every trainable parameter (one vector, as Mammoth's ``agem``); the memory
is filled after each experience with the :class:`~clpeft.components.ReplayBuffer` policy.
Mammoth's ``agem`` offers its reservoir only the first training batch of each task (it computes
``buffer_size // n_tasks`` samples per task and never uses it); clpeft offers every sample of the
experience. Given the same memory, training equals Mammoth's step by step
(``tests/reference/test_mammoth_replay.py``). Gradient clipping (``train.clip_grad``) applies to the
projected gradient. Defaults: Mammoth's best arguments for Seq-CIFAR-10 (replayed batch 32).

Paper symbols: episodic memory ``M`` -> ``mem_size``, reference batch size -> ``minibatch_size``.
"""

from typing import Annotated, Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from clpeft.components import ReplayBuffer
from clpeft.distributed import require_one_process
from clpeft.experience import Experience
from clpeft.registry import register_strategy
from clpeft.strategy import Strategy


def project(gradient: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """A-GEM's update direction (eq. 11): ``gradient``, or its projection orthogonal to ``reference``
    when the two point in opposite directions."""
    dot = torch.dot(gradient, reference)
    if dot >= 0:
        return gradient
    return gradient - dot / torch.dot(reference, reference) * reference


@register_strategy("agem")
class AGEM(Strategy):
    """A-GEM: project the gradient so the loss on a replayed memory batch does not increase (Chaudhry et al. 2019).

    Args:
        backbone: the feature extractor.
        mem_size: episodic memory ``M`` in samples.
        minibatch_size: samples in the batch ``g_ref`` is computed on.
        policy: how the memory keeps past samples: ``reservoir`` (Mammoth's) or ``class_balanced``.
    """

    supported_scenarios = ("class_incremental", "domain_incremental", "few_shot_class_incremental")

    def __init__(
        self,
        backbone,
        mem_size: Annotated[int, Field(ge=0)] = 200,
        minibatch_size: Annotated[int, Field(ge=1)] = 32,
        policy: Literal["reservoir", "class_balanced"] = "reservoir",
    ):
        require_one_process("agem", "its reference gradient is computed after the backward pass, outside the ranks' gradient averaging")
        super().__init__(backbone)
        self.memory = ReplayBuffer(mem_size, policy)
        self.minibatch_size = minibatch_size

    def after_backward(self) -> None:
        if not len(self.memory):
            return
        params = [p for p in self.parameters() if p.requires_grad]
        gradient = _flat_grad(params)
        for p in params:
            p.grad = None
        view = self.memory.sample(self.minibatch_size, self.experience.past)
        replayed = next(iter(self.batches(view, batch_size=len(view))))
        F.cross_entropy(self.predict(replayed.x), replayed.y).backward()
        direction = project(gradient, _flat_grad(params))
        for p, g in zip(params, direction.split([p.numel() for p in params])):
            p.grad = g.view_as(p).clone()

    def after_experience(self, exp: Experience) -> None:
        self.memory.update(exp)


def _flat_grad(params: list[torch.nn.Parameter]) -> torch.Tensor:
    """The parameters' gradients as one vector (zeros where a parameter has none)."""
    return torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in params])
