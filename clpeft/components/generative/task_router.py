"""Which task's adapter answers a prompt: the nearest task centroid of the frozen model's prompt embeddings.

Per-task adapters need a task for every test prompt. Without a task id, a router predicts it;
ExpertGate (Aljundi, Chakravarty & Tuytelaars, "Expert Gate: Lifelong Learning with a Network of
Experts", CVPR 2017, https://arxiv.org/abs/1611.06194) picks the expert whose task autoencoder
reconstructs the input best. :class:`TaskRouter` uses the simplest gate of that kind, a
nearest-mean classifier over tasks (the nearest-mean-of-exemplars rule of iCaRL, Rebuffi et al.,
CVPR 2017, https://arxiv.org/abs/1611.07725, with one mean per task):

    e(x) = (1 / |x|) sum_{i in prompt(x)} h_L(x)_i        (mean-pooled last hidden state of the frozen model)
    c_t  = mean of e(x) over task t's training prompts
    task(x) = argmin_t ||e(x) - c_t||_2                    (ties: the lower task)

Why this gate: it needs no training and no stored data (``c_t`` is a running sum and a count,
taken once after task ``t``; a linear classifier over tasks would need every task's prompts at
once, which an isolation method does not keep), the frozen model's embedding of a prompt never
changes as tasks are added, and its accuracy is exactly computable (the strategy reports it on
each task's test prompts). It fails where tasks share a prompt format and differ only in what is
asked of the same kind of input; then ``routing: task_id`` is the upper bound it falls short of.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from clpeft.backbones.generative_lm import GenerativeLM
from clpeft.backbones.text import pool
from clpeft.instructions import Instruction

__all__ = ["TaskRouter", "prompt_embeddings"]


@torch.no_grad()
def prompt_embeddings(backbone: GenerativeLM, prompts: Sequence[Instruction | str]) -> torch.Tensor:
    """``(N, D)`` ``e(x)``: the last hidden state of ``backbone.net`` (its decoder alone, no output
    layer) averaged over each prompt's tokens, as :meth:`GenerativeLM.generate` formats and cuts them.

    The adapters are whatever the model holds outside routing: the frozen model with
    :class:`~clpeft.components.generative.task_adapters.TaskAdapters`.
    """
    ids, mask = backbone.left_padded([backbone.prompt_ids(p)[-backbone.max_length :] for p in prompts])
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    hidden = backbone.net.base_model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False).last_hidden_state
    return pool(hidden.float(), mask, "mean")


class TaskRouter(nn.Module):
    """One centroid per task of prompt embeddings; predicts the nearest one's task (see the module docstring).

    Args:
        dim: the embeddings' width ``D``.
        max_tasks: the most tasks.

    Buffers (saved with the strategy): ``sums`` ``(max_tasks, D)`` float64, each task's sum of
    embeddings, and ``counts`` ``(max_tasks,)``, how many were added.
    """

    def __init__(self, dim: int, max_tasks: int):
        super().__init__()
        self.register_buffer("sums", torch.zeros(max_tasks, dim, dtype=torch.float64))
        self.register_buffer("counts", torch.zeros(max_tasks, dtype=torch.long))

    @torch.no_grad()
    def add(self, task: int, embeddings: torch.Tensor) -> None:
        """Count ``embeddings`` ``(N, D)`` of task ``task``'s training prompts into its centroid."""
        self.sums[task] += embeddings.double().sum(0)
        self.counts[task] += len(embeddings)

    @property
    def tasks(self) -> torch.Tensor:
        """The tasks that have a centroid, in order."""
        return torch.nonzero(self.counts, as_tuple=True)[0]

    def centroids(self) -> torch.Tensor:
        """``(len(tasks), D)`` ``c_t`` of :attr:`tasks`."""
        tasks = self.tasks
        return self.sums[tasks] / self.counts[tasks, None]

    @torch.no_grad()
    def predict(self, embeddings: torch.Tensor) -> torch.Tensor:
        """``(N,)`` the task of the centroid nearest each embedding (Euclidean; ``-1`` for all when no task has one)."""
        tasks = self.tasks
        if not len(tasks):
            return torch.full((len(embeddings),), -1, dtype=torch.long, device=embeddings.device)
        distances = torch.cdist(embeddings.double(), self.centroids())
        return tasks[distances.argmin(1)]
