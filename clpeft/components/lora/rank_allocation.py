"""Spend a total rank budget on the layers that matter most, a few ranks at a time.

IncreLoRA (Zhang et al., "IncreLoRA: Incremental Parameter Allocation Method for
Parameter-Efficient Fine-tuning", arXiv 2023, https://arxiv.org/abs/2308.12043) starts every
adapted layer at a small rank and, every few steps, adds rank to the layers with the highest
importance score until the total rank reaches a budget. The score is AdaLoRA's smoothed
sensitivity (Zhang et al., ICLR 2023, https://arxiv.org/abs/2303.10512): per parameter
``I = |w * dL/dw|``, ``I_bar`` an exponential moving average of ``I`` (``beta1``), ``U_bar`` one
of ``|I - I_bar|`` (``beta2``), ``s = I_bar * U_bar``; a layer's score is the mean of ``s``.
IncreLoRA scores the entries of the update matrix; here the entries of the factors ``A`` and
``B`` are scored (their gradients are at hand, and AdaLoRA scores factor entries too).

:meth:`RankAllocator.split` uses the same scores the other way round, for a learner that trains
at a generous rank and then keeps a total budget: it splits the budget across the layers in
proportion to their scores (each layer's share then picks its components by PRILoRA importance,
:meth:`~clpeft.components.lora.LoRALinear.prune`).

Typical loop::

    layers = inject_lora(model, ["qkv", "fc1"], rank=2, alpha=4)
    allocator = RankAllocator(layers, budget=8 * len(layers))
    named = dict(model.named_parameters())
    for step, batch in enumerate(loader):
        loss_fn(model, batch).backward()
        allocator.update()                      # while the gradients are there
        optimizer.step()
        optimizer.zero_grad()
        if step % interval == interval - 1 and allocator.allocate():
            now = dict(model.named_parameters())  # grown layers have new factors
            replace_parameters(optimizer, named, now)
            named = now
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from clpeft.components.lora.layer import LoRALinear
from clpeft.components.lora.sensitivity import SmoothedSensitivity
from clpeft.errors import UserError

__all__ = ["RankAllocator"]

_FACTORS = ("lora_A", "lora_B")


class RankAllocator:
    """IncreLoRA's incremental rank allocation over a set of :class:`LoRALinear` layers.

    Args:
        layers: the layers sharing the budget, by name (what :func:`inject_lora` returns).
        budget: total rank (sum over layers) that :meth:`allocate` may reach.
        top_k: how many of the highest-scoring layers grow per :meth:`allocate` call.
        rank_step: ranks added to each chosen layer per call.
        beta1: ``beta_1`` in AdaLoRA, the smoothing of the sensitivity ``I``.
        beta2: ``beta_2`` in AdaLoRA, the smoothing of the uncertainty ``|I - I_bar|``.
    """

    def __init__(
        self,
        layers: Mapping[str, LoRALinear],
        budget: int,
        *,
        top_k: int = 1,
        rank_step: int = 1,
        beta1: float = 0.85,
        beta2: float = 0.85,
    ):
        self.layers = dict(layers)
        self.budget = budget
        self.top_k = top_k
        self.rank_step = rank_step
        self.sensitivity = SmoothedSensitivity(beta1, beta2)
        if self.total_rank > budget:
            raise UserError(f"the layers already hold rank {self.total_rank}, more than the budget {budget}")

    @property
    def total_rank(self) -> int:
        return sum(layer.rank for layer in self.layers.values())

    @torch.no_grad()
    def update(self) -> None:
        """Fold the current gradients into the smoothed scores (call after each backward)."""
        for name, layer in self.layers.items():
            for factor in _FACTORS:
                self.sensitivity.update((name, factor), getattr(layer, factor))

    def scores(self) -> dict[str, float]:
        """Each layer's importance: the mean of ``I_bar * U_bar`` over its factor entries (0 if unseen)."""
        scores = {}
        for name, layer in self.layers.items():
            params = [getattr(layer, factor) for factor in _FACTORS]
            total = sum(self.sensitivity.score((name, f), p).sum().item() for f, p in zip(_FACTORS, params))
            scores[name] = total / max(sum(p.numel() for p in params), 1)
        return scores

    def allocate(self, generator: torch.Generator | None = None) -> dict[str, int]:
        """Grow the ``top_k`` highest-scoring layers by ``rank_step`` each, within the budget.

        ``generator`` draws the new ``A`` rows (:meth:`~clpeft.components.lora.LoRALinear.grow`).

        Returns:
            Ranks added, by layer name (empty once the budget is used). Grown layers have new
            ``lora_A``/``lora_B`` parameters: rebuild the optimizer, or carry it over with
            :func:`~clpeft.resizing.replace_parameters`, when this is not empty.
        """
        room = self.budget - self.total_rank
        scores = self.scores()
        grown = {}
        for name in sorted(scores, key=scores.__getitem__, reverse=True)[: self.top_k]:
            k = min(self.rank_step, room)
            if k <= 0:
                break
            self.layers[name].grow(k, generator)
            grown[name] = k
            room -= k
        return grown

    def split(self, budget: int) -> dict[str, int]:
        """Split a total rank ``budget`` across the layers in proportion to :meth:`scores`.

        Highest-averages (D'Hondt) apportionment: rank after rank, the next one goes to the
        layer with the largest ``score / (ranks_given + 1)`` among the layers still below their
        current rank (ties: the earlier layer). Every layer gets at most its current rank; a
        budget of at least the total rank keeps every layer whole.

        Returns:
            The rank of every layer, by name; the values sum to ``min(budget, total_rank)``.
        """
        if budget < 0:
            raise UserError(f"a rank budget must be >= 0, got {budget}")
        scores = self.scores()
        given = dict.fromkeys(self.layers, 0)
        for _ in range(min(budget, self.total_rank)):
            open_layers = [name for name, layer in self.layers.items() if given[name] < layer.rank]
            best = max(open_layers, key=lambda name: scores[name] / (given[name] + 1))
            given[best] += 1
        return given
