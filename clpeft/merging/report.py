"""The merge report: per-tensor statistics of a merge, written as JSON next to its output.

For each merged tensor, with task vectors ``tau_k`` and merged task vector ``tau_m``:

* ``density``: fraction of non-zero entries of ``tau_m`` (about ``1`` for task arithmetic, near
  the trim density for TIES, ``1 - p^K`` for DARE);
* ``sign_conflict``: fraction of entries where two task vectors have non-zero entries of
  opposite sign (the interference TIES resolves), measured on a sample of ``32768 / K``
  entries per task vector (evenly spaced runs of 64); null for LoRA task arithmetic, which
  never forms the dense deltas;
* ``task_vector_norms``: ``||tau_k||_2`` per model; ``merged_norm``: ``||tau_m||_2``.

The statistics are computed on the merge device and packed into one small tensor per merged
tensor, so a GPU merge copies a few numbers back per tensor and never synchronises early (the
CPU kernel's are Python floats from the start).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

__all__ = [
    "MergeReport",
    "TensorReport",
    "count_nonzero",
    "pack_host_sums",
    "pack_stats",
    "pack_sums",
    "sample_entries",
    "sample_runs",
    "sign_conflict",
]

# Sampled entries over all rows: below torch's parallel grain size (32768), so the statistic
# never starts a parallel region (each costs milliseconds on a busy machine).
_SAMPLE = 1 << 15
SAMPLE_RUN = 64  # entries per sampled run (:func:`sample_runs`)


@dataclass(frozen=True)
class TensorReport:
    """Statistics of one output tensor (only the name and shape for tensors copied from the base)."""

    name: str
    shape: list[int]
    merged: bool
    density: float | None = None
    sign_conflict: float | None = None
    task_vector_norms: list[float] | None = None
    merged_norm: float | None = None


@dataclass
class MergeReport:
    """What a merge did: inputs, method, timing and per-tensor statistics."""

    method: str
    parameters: dict[str, Any]
    base: str
    models: list[str]
    device: str
    seed: int
    seconds: float = 0.0
    tensors: list[TensorReport] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        merged = [t for t in self.tensors if t.merged]
        return {
            **{k: v for k, v in asdict(self).items() if k != "tensors"},
            "summary": {
                "tensors": len(self.tensors),
                "merged": len(merged),
                "copied_from_base": len(self.tensors) - len(merged),
                "mean_density": _mean([t.density for t in merged]),
                "mean_sign_conflict": _mean([t.sign_conflict for t in merged]),
            },
            "tensors": [asdict(t) for t in self.tensors],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)


def _mean(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return sum(present) / len(present) if present else None


def sample_entries(tensor: torch.Tensor, rows: int) -> torch.Tensor:
    """The entries of ``tensor``'s last dimension that the sign-conflict statistic of ``rows``
    task vectors looks at: ``32768 / rows`` of them in evenly spaced runs of 64 (cache-friendly),
    or all of a smaller tensor. Sampling commutes with subtraction, so the sample of the task
    vectors is the samples of the fine-tuned tensors minus the base's."""
    layout = sample_runs(tensor.shape[-1], rows)
    if layout is None:
        return tensor
    count, step = layout
    usable = tensor.shape[-1] // SAMPLE_RUN * SAMPLE_RUN
    runs = tensor[..., :usable].unflatten(-1, (usable // SAMPLE_RUN, SAMPLE_RUN))
    return runs[..., ::step, :][..., :count, :].flatten(-2)


def sample_runs(n: int, rows: int) -> tuple[int, int] | None:
    """:func:`sample_entries`' layout for ``n`` entries: ``(count, step)``, the sample being ``count`` runs
    of ``SAMPLE_RUN`` entries, one every ``step`` runs from the first; ``None`` when every entry is sampled."""
    per_row = max(SAMPLE_RUN, _SAMPLE // rows // SAMPLE_RUN * SAMPLE_RUN)
    if n <= per_row:
        return None
    return per_row // SAMPLE_RUN, max(1, n // SAMPLE_RUN * SAMPLE_RUN // per_row)


def sign_conflict(task_vectors: torch.Tensor) -> torch.Tensor:
    """Fraction of (sampled) entries where two rows have non-zero entries of opposite sign."""
    sample = sample_entries(task_vectors, task_vectors.shape[0])
    return ((sample.amax(dim=0) > 0) & (sample.amin(dim=0) < 0)).to(sample.dtype).mean()


_COUNT_BLOCK = 1 << 20  # entries whose non-zero mask is formed at once


def count_nonzero(values: torch.Tensor) -> torch.Tensor:
    """``torch.count_nonzero(values)`` (NaN counts). On the CPU as byte sums over blocks of 2^20 entries:
    branch-free (``count_nonzero`` slows to ~5 ns per entry on a random pattern of zeros, this ~1.3 ns)
    and with temporaries of a block (a whole-tensor mask summed in int32 allocates 5 bytes per entry)."""
    if values.device.type != "cpu":
        return torch.count_nonzero(values)
    flat = values.reshape(-1)
    total = sum(
        int((flat[start : start + _COUNT_BLOCK] != 0).view(torch.uint8).sum(dtype=torch.int32))
        for start in range(0, flat.numel(), _COUNT_BLOCK)
    )
    return torch.tensor(total)


def pack_stats(base: torch.Tensor, norms: torch.Tensor, conflict: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """``[||theta_0||, sign_conflict, ||tau_m||, density, ||tau_1||, ..., ||tau_K||]`` as one tensor."""
    head = torch.stack(
        [
            torch.linalg.vector_norm(base).to(norms.dtype),
            conflict.to(norms.dtype),
            torch.linalg.vector_norm(delta).to(norms.dtype),
            count_nonzero(delta).to(norms.dtype) / max(delta.numel(), 1),
        ]
    )
    return torch.cat([head, norms])


def pack_sums(sums: torch.Tensor, conflict: torch.Tensor, numel: int) -> torch.Tensor:
    """:func:`pack_stats`' layout from the sums :func:`~clpeft.merging.fused.linear_merge` returns:
    ``[sum theta_0^2, sum tau_m^2, count(tau_m != 0), sum tau_1^2, ..., sum tau_K^2]``."""
    if sums.device.type == "cpu" and conflict.device.type == "cpu":  # the same values in Python floats, no ATen call each
        return torch.tensor(pack_host_sums(sums.tolist(), float(conflict), numel), dtype=sums.dtype)
    head = torch.stack([sums[0].sqrt(), conflict.to(sums.dtype), sums[1].sqrt(), sums[2] / max(numel, 1)])
    return torch.cat([head, sums[3:].sqrt()])


def pack_host_sums(sums: Sequence[float], conflict: float, numel: int) -> list[float]:
    """:func:`pack_sums` in Python floats, for sums already on the host (the CPU kernel's)."""
    base, delta, nonzero, *tasks = sums
    return [math.sqrt(base), conflict, math.sqrt(delta), nonzero / max(numel, 1), *map(math.sqrt, tasks)]


def unpack_stats(name: str, shape: Sequence[int], packed: Sequence[float]) -> TensorReport:
    """The :class:`TensorReport` of a tensor from its :func:`pack_stats` values."""
    _, conflict, merged_norm, density, *norms = packed
    return TensorReport(
        name=name,
        shape=list(shape),
        merged=True,
        density=density,
        sign_conflict=None if math.isnan(conflict) else conflict,
        task_vector_norms=list(norms),
        merged_norm=merged_norm,
    )
