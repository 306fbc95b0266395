"""LiNeS: layer-increasing network scaling of the merged task vector.

Wang, Dimitriadis, Favero, Ortiz-Jimenez, Fleuret and Frossard, "LiNeS: Post-training Layer
Scaling Prevents Forgetting and Enhances Model Merging", ICLR 2025,
https://arxiv.org/abs/2410.17146. The multi-task vector is scaled by a coefficient that grows
linearly with the depth ``l`` of the block it belongs to (``L`` blocks, ``l = 0 ... L - 1``):

    tau_m^(l) = (alpha + beta * l / (L - 1)) * tau_MTL^(l),    tau_MTL = sum_t tau_t,

so shallow layers stay near the pretrained weights and deep ones keep the tasks' features;
tensors outside the blocks (embeddings, final norm) get ``alpha``. For multi-task merging the
official code sets ``alpha = (||sum_t tau_t||_1 / ||tau_MTL||_1) / T`` (``alpha: null``; L1 norms
over the whole model, ``norm_summed_tvs`` and ``norm_mtv`` of ``src/eval/aggregation.py``,
used in ``evaluate`` of ``src/eval/eval.py``), which is ``1 / T`` for task arithmetic's
``tau_MTL``, and searches ``beta`` on validation data over 0.1-1.0; the default 0.5 is that
grid's middle (``--search beta=...``).

LiNeS on TIES. With ``merge: ties`` the scaled vector ``tau_MTL`` is TIES' merged task vector
(:func:`~clpeft.merging.methods.ties.multi_task_vector`; keys ``density``, ``trim``,
``trim_scope``, ``disjoint`` as for :mod:`~clpeft.merging.methods.ties`), the official code's
``method=ties apply_lines=true`` (its ``config/method/ties.yaml``: ``k`` 20, ``agg`` mean, the
defaults here). ``alpha: null`` then needs both L1 norms of the whole model: the engine sweeps
the model once more before merging (after TIES' threshold sweeps). Equal to the official code
on random state dicts (tests/reference/test_ties_variants.py), up to TIES' deliberate
differences (one entry per task fewer kept, the sign of an exactly cancelling entry).

Depth. A tensor's block is the first number between dots in its name matched by
``block_pattern`` (``blocks.3.attn.qkv.weight``, ``model.layers.3.mlp...``, ``resblocks.3...``:
3). ``L`` is ``num_blocks``, or else one more than the largest block number among the merged
tensors (known to the engine before the merge). The official code instead looks for ".0.",
".1.", ... in that order and takes the first found; both agree on names with one number.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated, Any

import torch
from pydantic import Field

from clpeft.errors import UserError
from clpeft.merging.methods.generalized import Disjoint
from clpeft.merging.methods.sparsify import Trim
from clpeft.merging.methods.ties import Density, MultiTask, TrimScope, model_thresholds, multi_task_vector
from clpeft.merging.registry import ModelShape, merge_method

Alpha = Annotated[
    float | None,
    Field(description="alpha: scaling of the first block and of tensors outside the blocks (null: ||sum_t tau_t||_1 / ||tau_MTL||_1 / T)"),
]
Beta = Annotated[float, Field(description="beta: added scaling of the last block over the first")]
BlockPattern = Annotated[str, Field(description="regular expression whose first group is a tensor's block number")]
NumBlocks = Annotated[
    int | None, Field(ge=1, description="L: number of blocks (null: the largest block number among the merged tensors + 1)")
]


def block_index(name: str, pattern: str) -> int | None:
    """The block number of tensor ``name`` (None outside the blocks)."""
    match = re.search(pattern, name)
    return None if match is None else int(match.group(1))


@dataclass(frozen=True)
class LinesInputs:
    """What LiNeS needs of the whole model: ``L`` (None: ``num_blocks``), TIES' thresholds and
    ``||sum_t tau_t||_1 / ||tau_MTL||_1`` (1 for task arithmetic or a given ``alpha``)."""

    count: int | None = None
    thresholds: torch.Tensor | None = None
    norm_ratio: float = 1.0


class LinesStatistic:
    """``L`` from the merged tensors' names; then TIES' threshold sweeps and one sweep for the L1 norms.

    A :class:`~clpeft.merging.registry.ModelStatistic`; the norm sweep forms TIES' merged vector
    with the thresholds the earlier sweeps found, as the merge will.
    """

    def __init__(self, params: Mapping[str, Any], shape: ModelShape):
        blocks = [block_index(name, params["block_pattern"]) for name in shape.names]
        self.count = max((b for b in blocks if b is not None), default=0) + 1 if params["num_blocks"] is None else None
        ties = params["merge"] == "ties"
        self.thresholds = model_thresholds(params, shape) if ties else None
        self.norms = torch.zeros(2, dtype=torch.float64, device=shape.device) if ties and params["alpha"] is None else None
        self.norms_pending = self.norms is not None
        self.ties_keys = {key: params[key] for key in ("density", "trim", "disjoint")}

    def _thresholds_pending(self) -> bool:
        return self.thresholds is not None and self.thresholds.wants_sweep()

    def _threshold_values(self) -> torch.Tensor | None:
        return None if self.thresholds is None else self.thresholds.result()

    def wants_sweep(self) -> bool:
        return self._thresholds_pending() or self.norms_pending

    def observe(self, task_vectors: torch.Tensor) -> None:
        if self._thresholds_pending():
            self.thresholds.observe(task_vectors)
            return
        self.norms[0] += task_vectors.sum(dim=0).abs().sum(dtype=torch.float64)
        merged = multi_task_vector(task_vectors, "ties", thresholds=self._threshold_values(), **self.ties_keys)
        self.norms[1] += merged.abs().sum(dtype=torch.float64)

    def end_sweep(self) -> None:
        if self._thresholds_pending():
            self.thresholds.end_sweep()
        else:
            self.norms_pending = False

    def result(self) -> LinesInputs:
        ratio = 1.0 if self.norms is None or self.norms[1] == 0 else float(self.norms[0] / self.norms[1])
        return LinesInputs(self.count, self._threshold_values(), ratio)


def _lines_statistic(params: Mapping[str, Any], shape: ModelShape) -> LinesStatistic | None:
    if params["num_blocks"] is not None and params["merge"] == "task_arithmetic":
        return None
    return LinesStatistic(params, shape)


@merge_method("lines", reference_url="https://arxiv.org/abs/2410.17146", model_statistic=_lines_statistic)
def lines(
    task_vectors: torch.Tensor,
    *,
    alpha: Alpha = None,
    beta: Beta = 0.5,
    block_pattern: BlockPattern = r"\.(\d+)\.",
    num_blocks: NumBlocks = None,
    merge: MultiTask = "task_arithmetic",
    density: Density = 0.2,
    trim: Trim = "threshold",
    trim_scope: TrimScope = "model",
    disjoint: Disjoint = "mean",
    name: str,
    model_statistic: LinesInputs | None = None,
) -> torch.Tensor:
    """LiNeS: the summed (or TIES-merged) task vectors scaled by alpha + beta * l / (L - 1) for block l (Wang et al., ICLR 2025).

    ``model_statistic`` is the engine's whole-model pass (:class:`LinesStatistic`); a direct call
    without it has no ``L`` but ``num_blocks``, trims this tensor alone and takes ``alpha`` 1 / T.
    """
    inputs = model_statistic or LinesInputs()
    first = inputs.norm_ratio / task_vectors.shape[0] if alpha is None else alpha
    count = num_blocks or inputs.count
    block = block_index(name, block_pattern)
    if block is None or count is None or count == 1:
        coefficient = first
    elif block >= count:
        raise UserError(f"tensor '{name}' is in block {block} but num_blocks is {count}; raise num_blocks", key="parameters.num_blocks")
    else:
        coefficient = first + beta * block / (count - 1)
    merged = multi_task_vector(task_vectors, merge, density=density, trim=trim, disjoint=disjoint, thresholds=inputs.thresholds)
    return merged.mul_(coefficient)
