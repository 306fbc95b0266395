"""L2P's prompt pool: prompts chosen per input by key-query matching.

Wang et al., "Learning to Prompt for Continual Learning", CVPR 2022
(https://arxiv.org/abs/2112.08654), Sec. 4.2. A pool of ``M`` prompts ``P_i`` (``L_p x D``),
each paired with a learnable key ``k_i``. The query ``q(x)`` is the frozen pretrained model's
feature of ``x`` (its [CLS] token); with the cosine distance ``gamma(q, k) = 1 - cos(q, k)`` the
``N`` nearest keys select the prompts (eq. 3)::

    K_x = argmin_{ {s_1..s_N} subset of [1, M] }  sum_i gamma(q(x), k_{s_i})

and ``x_p = [P_{s_1}; ...; P_{s_N}; x_e]``. The surrogate loss pulls the selected keys towards
the query (the second term of eq. 5), averaged over the batch::

    L_match = sum_{s_i in K_x} gamma(q(x), k_{s_i})

The official code (google-research/l2p, JH-LEE-KR/l2p-pytorch) subtracts ``lambda * sum cos``
instead, which differs from ``lambda * L_match`` by a constant: same gradients.

Options:

* **diversity** (Sec. 4.2, "optionally diversifying prompt-selection"): at training time the
  distances are weighted by the normalised frequencies ``h_i`` with which prompts were chosen
  during the previous tasks, ``argmin sum_i gamma(q(x), k_{s_i}) * h_{s_i}`` (eq. 4), so rarely
  used prompts are preferred. Inference uses eq. 3 unchanged.
* **batch-wise selection** (official code's ``batchwise_prompt``): the ``N`` prompts chosen
  most often within the batch are used for every sample. When a test batch holds one
  experience's data (as in the official evaluation and clpeft's), this pools task evidence
  across its samples: a sample's prediction depends on its batch mates.

Initialisation as in the official code: prompts and keys uniform in ``[-1, 1]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from clpeft.distributed import World, current


@dataclass
class PromptSelection:
    """What :class:`PromptPool` returns for a batch.

    Attributes:
        prompts: ``(B, N * L_p, D)`` selected prompts, concatenated in selection order.
        indices: ``(B, N)`` selected prompt indices.
        matching_loss: ``L_match`` averaged over the batch (a scalar with gradient to the keys).
    """

    prompts: torch.Tensor
    indices: torch.Tensor
    matching_loss: torch.Tensor


def cosine_distance(query: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """``gamma(q, k) = 1 - cos(q, k)`` for every query and key: ``(B, Dk), (M, Dk) -> (B, M)``."""
    return 1 - F.normalize(query, dim=-1) @ F.normalize(keys, dim=-1).T


def batchwise_majority(indices: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` indices chosen most often in a ``(B, N)`` batch of choices, for every row.

    Ties go to the smaller index. The official code takes ``topk`` of the vote counts of the
    sorted ids, which leaves the order of ties to torch (unspecified, and different on CPU and
    CUDA): where the ``k``-th and ``k+1``-th counts tie, it may choose other prompts.
    """
    ids, counts = torch.unique(indices, return_counts=True, sorted=True)
    if len(ids) < k:  # fewer distinct choices than slots: the official code pads with the smallest id
        ids = torch.cat([ids, ids[:1].expand(k - len(ids))])
        counts = torch.cat([counts, counts.new_zeros(k - len(counts))])
    order = torch.sort(counts, descending=True, stable=True).indices[:k]
    return ids[order].expand(indices.shape[0], -1)


class PromptPool(nn.Module):
    """A pool of ``M`` prompts with keys; each input gets the ``N`` prompts whose keys match its query.

    Args:
        pool_size: ``M``, the number of prompts.
        length: ``L_p``, tokens per prompt.
        embed_dim: ``D``, the token width of the ViT.
        top_k: ``N``, prompts selected per input.
        key_dim: width of keys and queries (the query feature's width; ``D`` by default).
        batchwise: use the ``N`` prompts chosen most often in the batch for every sample.
        diversity: weight the training-time distances by the prompts' normalised selection
            frequencies over previous tasks (eq. 4).
    """

    def __init__(
        self,
        pool_size: int,
        length: int,
        embed_dim: int,
        top_k: int,
        key_dim: int | None = None,
        batchwise: bool = False,
        diversity: bool = False,
    ):
        super().__init__()
        if not 1 <= top_k <= pool_size:
            raise ValueError(f"top_k must be between 1 and pool_size={pool_size}, got {top_k}")
        self.top_k = top_k
        self.batchwise = batchwise
        self.diversity = diversity
        self.prompts = nn.Parameter(torch.empty(pool_size, length, embed_dim).uniform_(-1, 1))
        self.keys = nn.Parameter(torch.empty(pool_size, key_dim or embed_dim).uniform_(-1, 1))
        # selections made while training, and h: their normalised counts before the current task
        self.register_buffer("counts", torch.zeros(pool_size))
        self.register_buffer("frequency", torch.zeros(pool_size))
        # selections of this process not yet added to ``counts`` (see :meth:`synchronize`)
        self.register_buffer("pending", torch.zeros(pool_size), persistent=False)

    @property
    def pool_size(self) -> int:
        return self.prompts.shape[0]

    def synchronize(self, world: World) -> None:
        """Add every rank's pending selections to ``counts`` (an all-reduced sum)."""
        self.counts += world.all_reduce_sum(self.pending)
        self.pending.zero_()

    def start_task(self) -> None:
        """Freeze the frequencies ``h`` of the tasks so far (call before training on a new task)."""
        self.synchronize(current())
        total = self.counts.sum()
        self.frequency.copy_(self.counts / total if total > 0 else self.counts)

    def select(self, query: torch.Tensor, train: bool = False) -> torch.Tensor:
        """Indices ``(B, N)`` of the selected prompts, nearest first (eq. 3; eq. 4 when training with diversity)."""
        distance = cosine_distance(query.detach().float(), self.keys.detach().float())
        if train and self.diversity and self.frequency.sum() > 0:
            distance = distance * self.frequency
        indices = torch.topk(distance, self.top_k, dim=1, largest=False).indices
        return batchwise_majority(indices, self.top_k) if self.batchwise else indices

    def forward(self, query: torch.Tensor, train: bool = False) -> PromptSelection:
        """Select prompts for a batch of queries ``(B, Dk)``; ``train`` counts the selections."""
        indices = self.select(query, train)
        if train:
            self.pending += torch.bincount(indices.flatten(), minlength=self.pool_size).to(self.pending)
        keys = F.normalize(self.keys, dim=-1)[indices]  # (B, N, Dk)
        cos = (keys * F.normalize(query, dim=-1).to(keys.dtype).unsqueeze(1)).sum(-1)
        prompts = self.prompts[indices].flatten(1, 2)  # (B, N * L_p, D)
        return PromptSelection(prompts, indices, (1 - cos).sum(1).mean())
