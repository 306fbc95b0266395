"""Linear merges on the GPU in one pass: a Triton kernel per tensor.

Task arithmetic and the mean give ``theta_0 + sum_k c_k (theta_k - theta_0)`` (Ilharco et al.,
ICLR 2023, Section 2). Formed op by op on the device, the K task vectors are written to memory
and read back by the norms and by the weighted sum, about ``5K + 7`` passes over the tensor's
size. This kernel reads the base and each fine-tuned tensor once and writes the merged tensor
once (``K + 2``), adding each block's sums of squares and non-zero count to the merge report's
statistics on the way (float64 atomics).

The engine uses it for CUDA merges of linear methods when Triton is importable, the tensors are
float32, float16 or bfloat16 and the fine-tuned tensors share one dtype; everything else takes
the op-by-op path. ``merge(..., fused=False)`` switches it off (for side-by-side timings).
The first merge in a fresh environment compiles the kernel, once per number of models and
dtype (Triton caches it on disk).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover (CPU-only installs without Triton)
    triton = None

__all__ = ["linear_merge", "supports"]

_BLOCK = 2048  # entries per program: large enough to amortise the K + 3 atomics per block


def supports(device: torch.device, base: torch.Tensor, sources: Sequence[torch.Tensor]) -> bool:
    """Whether :func:`linear_merge` applies to these tensors on ``device``."""
    dtypes = {torch.float32, torch.float16, torch.bfloat16}
    return (
        triton is not None
        and device.type == "cuda"
        and base.dtype in dtypes
        and len({s.dtype for s in sources}) == 1  # one dtype, and at least one model
        and sources[0].dtype in dtypes
        and base.numel() > 0
    )


def linear_merge(base: torch.Tensor, sources: Sequence[torch.Tensor], coefficients: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Write ``base + sum_k coefficients[k] (sources[k] - base)`` into ``out`` (computed in float32).

    Args:
        base: the flat base tensor ``theta_0``.
        sources: the K flat fine-tuned tensors ``theta_k``, one dtype, same length as ``base``.
        coefficients: ``(K,)`` float32 ``c_k`` on the tensors' device.
        out: flat output, any floating dtype (the sum is rounded to it once).

    Returns:
        float64 ``[sum theta_0^2, sum tau_m^2, count(tau_m != 0), sum tau_1^2, ..., sum tau_K^2]``
        where ``tau_m`` is the merged task vector (before rounding to ``out``'s dtype).
    """
    n, k = base.numel(), len(sources)
    sums = torch.zeros(3 + k, dtype=torch.float64, device=base.device)
    pointers = torch.tensor([s.data_ptr() for s in sources], dtype=torch.int64, pin_memory=base.is_cuda)
    pointers = pointers.to(base.device, non_blocking=True)
    grid = (triton.cdiv(n, _BLOCK),)
    _linear_merge_kernel[grid](base, pointers, coefficients, out, sums, n, K=k, SOURCE_DTYPE=_TRITON_DTYPES[sources[0].dtype], BLOCK=_BLOCK)
    return sums


if triton is not None:
    _TRITON_DTYPES = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}

    @triton.jit(do_not_specialize=["n"])  # one compiled variant for every tensor length
    def _linear_merge_kernel(
        base_ptr,
        sources_ptr,
        coefficients_ptr,
        out_ptr,
        sums_ptr,
        n,
        K: tl.constexpr,
        SOURCE_DTYPE: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        inside = offsets < n
        base = tl.load(base_ptr + offsets, mask=inside, other=0.0).to(tl.float32)
        delta = tl.zeros([BLOCK], dtype=tl.float32)
        for k in tl.static_range(K):
            source = tl.load(sources_ptr + k).to(tl.pointer_type(SOURCE_DTYPE))
            task_vector = tl.load(source + offsets, mask=inside, other=0.0).to(tl.float32) - base
            delta += tl.load(coefficients_ptr + k) * task_vector
            tl.atomic_add(sums_ptr + 3 + k, tl.sum(task_vector * task_vector, axis=0).to(tl.float64))
        tl.store(out_ptr + offsets, (base + delta).to(out_ptr.dtype.element_ty), mask=inside)
        tl.atomic_add(sums_ptr + 0, tl.sum(base * base, axis=0).to(tl.float64))
        tl.atomic_add(sums_ptr + 1, tl.sum(delta * delta, axis=0).to(tl.float64))
        tl.atomic_add(sums_ptr + 2, tl.sum((delta != 0).to(tl.float64), axis=0))
