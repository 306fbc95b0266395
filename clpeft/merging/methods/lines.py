"""LiNeS: layer-increasing network scaling of the merged task vector.

Wang, Dimitriadis, Favero, Ortiz-Jimenez, Fleuret and Frossard, "LiNeS: Post-training Layer
Scaling Prevents Forgetting and Enhances Model Merging", ICLR 2025,
https://arxiv.org/abs/2410.17146. The multi-task vector is scaled by a coefficient that grows
linearly with the depth ``l`` of the block it belongs to (``L`` blocks, ``l = 0 ... L - 1``):

    tau_m^(l) = (alpha + beta * l / (L - 1)) * tau_MTL^(l),    tau_MTL = sum_t tau_t,

so shallow layers stay near the pretrained weights and deep ones keep the tasks' features;
tensors outside the blocks (embeddings, final norm) get ``alpha``. For multi-task merging the
official code sets ``alpha = (||sum_t tau_t|| / ||tau_MTL||) / T``, which is ``1 / T`` for
task arithmetic's ``tau_MTL`` (the default here, ``alpha: null``) and searches ``beta`` on
validation data over 0.1-1.0; the default 0.5 is that grid's middle (``--search beta=...``).

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
from clpeft.merging.registry import ModelShape, merge_method

Alpha = Annotated[float | None, Field(description="alpha: scaling of the first block and of tensors outside the blocks (null: 1 / T)")]
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
class BlockCount:
    """``L`` from the merged tensors' names (no sweep over their task vectors)."""

    count: int

    def wants_sweep(self) -> bool:
        return False

    def observe(self, task_vectors: torch.Tensor) -> None:  # never called: no sweep
        raise AssertionError("BlockCount needs no sweep")

    def end_sweep(self) -> None:
        pass

    def result(self) -> int:
        return self.count


def _block_count(params: Mapping[str, Any], shape: ModelShape) -> BlockCount | None:
    if params["num_blocks"] is not None:
        return None
    blocks = [block_index(name, params["block_pattern"]) for name in shape.names]
    return BlockCount(max((b for b in blocks if b is not None), default=0) + 1)


@merge_method("lines", reference_url="https://arxiv.org/abs/2410.17146", model_statistic=_block_count)
def lines(
    task_vectors: torch.Tensor,
    *,
    alpha: Alpha = None,
    beta: Beta = 0.5,
    block_pattern: BlockPattern = r"\.(\d+)\.",
    num_blocks: NumBlocks = None,
    name: str,
    model_statistic: int | None = None,
) -> torch.Tensor:
    """LiNeS: the summed task vectors scaled by alpha + beta * l / (L - 1) for block l (Wang et al., ICLR 2025)."""
    first = 1.0 / task_vectors.shape[0] if alpha is None else alpha
    count = num_blocks or model_statistic
    block = block_index(name, block_pattern)
    if block is None or count is None or count == 1:
        coefficient = first
    elif block >= count:
        raise UserError(f"tensor '{name}' is in block {block} but num_blocks is {count}; raise num_blocks", key="parameters.num_blocks")
    else:
        coefficient = first + beta * block / (count - 1)
    return task_vectors.sum(dim=0).mul_(coefficient)
