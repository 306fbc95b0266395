"""Task vectors in the compute dtype, formed one cached block of columns at a time (host only).

LLM checkpoints ship in bfloat16 or float16, but merges compute in float32 (float64 for float64
tensors, :func:`compute_dtype`): a task vector ``tau_k = theta_k - theta_0`` rounded to bf16's 8
significant bits, and sums and norms accumulated in it, would lose accuracy, and a CPU without
native bf16 arithmetic emulates it element by element. A mixed ``torch.sub(bf16, fp32)`` also
converts inside its inner loop, on PyTorch's slow scalar path (issue 24: it dominated the
profile of bf16 merges). So each block of an input is converted once, by a vectorised copy into
a float32 buffer that stays in the caches, and all arithmetic runs on float32.

:func:`subtract_rows` forms whole task vectors this way (TIES, DARE: methods that need them whole).
:func:`combine_linear` runs a linear method (task arithmetic, the mean) entirely block by block:
task vectors, their norms, the weighted sum ``tau_m = sum_k c_k tau_k`` (Ilharco et al., ICLR
2023, Section 2), the report's statistics and the output ``theta_0 + tau_m`` rounded to its dtype,
so main memory sees each input once and the output once. Float32 inputs take exactly the ops
they took before blocking (the merged tensors are equal bit for bit); a bf16 or fp16 input's
converted entries are exact, so its merged tensor is the float32 result rounded once.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from clpeft.merging import fused_cpu
from clpeft.merging.report import count_nonzero

__all__ = ["BLOCK_COLUMNS", "combine_linear", "compute_dtype", "subtract_rows"]

# Columns per block: K x 2^18 float32 (8 MiB at K = 8) stays cached between the subtraction,
# the norms and the weighted sum. 2^16-2^20 were measured on fp32 ViT-B; 2^18 was fastest.
BLOCK_COLUMNS = 1 << 18


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype task vectors are formed in: float64 for float64 tensors, float32 for the rest."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def subtract_rows(out: torch.Tensor, sources: Sequence[torch.Tensor], base: torch.Tensor) -> torch.Tensor | None:
    """``out[k] = sources[k] - base`` in ``out``'s dtype, each source converted once per block (on the CPU
    in one compiled pass per row that also sums its squares, :func:`~clpeft.merging.fused_cpu.subtract`).

    Args:
        out: ``(K, n)`` rows in the compute dtype (``base``'s).
        sources: K flat tensors of length at least ``n``, any floating dtypes.
        base: flat, ``n`` entries, in ``out``'s dtype.

    Returns:
        float64 ``(K,)`` sums of squares of the rows when the compiled pass formed every row, else None.
    """
    n = out.shape[1]
    converted, squares = [], []
    for row, source in zip(out, sources):
        if fused_cpu.supports_subtraction(source[:n], base, row):
            squares.append(fused_cpu.subtract(source[:n], base, row))
        elif source.dtype == out.dtype:
            torch.sub(source[:n], base, out=row)
        else:
            converted.append((row, source))
    for start in range(0, n if converted else 0, BLOCK_COLUMNS):
        stop = min(n, start + BLOCK_COLUMNS)
        for row, source in converted:
            row[start:stop].copy_(source[start:stop]).sub_(base[start:stop])
    return torch.tensor(squares, dtype=torch.float64) if len(squares) == len(out) else None


def combine_linear(
    base: torch.Tensor,
    sources: Sequence[torch.Tensor],
    coefficients: torch.Tensor,
    out: torch.Tensor,
    scratch: torch.Tensor,
) -> torch.Tensor:
    """Write ``base + sum_k coefficients[k] (sources[k] - base)`` into ``out``, block by block.

    Args:
        base: the flat base tensor ``theta_0``, any floating dtype.
        sources: the K flat fine-tuned tensors ``theta_k`` (any floating dtypes, ``base``'s length).
        coefficients: ``(K,)`` ``c_k`` in the compute dtype.
        out: flat output in the output dtype (``base``'s), rounded to once.
        scratch: ``(K + 2, min(n, BLOCK_COLUMNS))`` work rows in the compute dtype.

    Returns:
        float64 ``[sum theta_0^2, sum tau_m^2, count(tau_m != 0), sum tau_1^2, ..., sum tau_K^2]``
        (:func:`~clpeft.merging.report.pack_sums`' input), the sums from each block's norms.
    """
    n, k = base.numel(), len(sources)
    starts = range(0, n, BLOCK_COLUMNS)
    norms = scratch.new_zeros(len(starts), 3 + k)  # per block: ||theta_0||, ||tau_m||, 0 (the count's slot), ||tau_k||
    nonzero = 0
    for start, block_norms in zip(starts, norms):
        stop = min(n, start + BLOCK_COLUMNS)
        rows = scratch[:, : stop - start]
        task_vectors, base_block, delta = rows[:k], rows[k], rows[k + 1]
        if base.dtype == scratch.dtype:
            base_block = base[start:stop]
        else:
            base_block.copy_(base[start:stop])
        subtract_rows(task_vectors, [s[start:stop] for s in sources], base_block)
        torch.linalg.vector_norm(task_vectors, dim=1, out=block_norms[3:])
        # c_0 tau_0 + c_1 tau_1 + ... added in order, each product rounded: the compiled kernel's
        # operations (torch.mv would leave the order and fused multiply-adds to the BLAS)
        task_vectors.mul_(coefficients[:, None])
        delta.copy_(task_vectors[0])
        for scaled in task_vectors[1:]:
            delta.add_(scaled)
        torch.linalg.vector_norm(base_block, out=block_norms[0])
        torch.linalg.vector_norm(delta, out=block_norms[1])
        nonzero += int(count_nonzero(delta))
        if out.dtype == scratch.dtype:
            torch.add(base_block, delta, out=out[start:stop])
        else:
            out[start:stop].copy_(delta.add_(base_block))
    sums = norms.double().square_().sum(dim=0)
    sums[2] = nonzero
    return sums
