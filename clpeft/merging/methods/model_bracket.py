"""TIES' whole-model cut-off bracketed from a sample: two cheap sweeps instead of two radix sweeps.

:class:`~clpeft.merging.methods.model_trim.KthLargestMagnitude` finds each task's k-th largest
magnitude over the whole model. On the CPU in float32 it first tries Floyd and Rivest's
selection (CACM 1975, "Algorithm 489"), as the per-tensor trim does
(``clpeft_kth_largest_magnitude`` in ``linear_merge.c``):

1. a sample sweep reads a systematic sample of the concatenated model (runs of 16 entries, one
   run every ``stride`` entries; ``N / 512`` entries, 16,384 to 2^20) and brackets the answer
   six standard deviations either side of its expected rank in the sample;
2. a band sweep counts, per task, the magnitudes above the bracket and at its two ends, and copies
   those strictly inside it (a few percent of the model, held in memory;
   :func:`~clpeft.merging.fused_cpu.band_magnitudes`: straight from the inputs);
3. the answer is an end of the bracket or the radix selection's over the band.

When a task's answer falls outside its bracket, or a band would not fit, :meth:`resolve` returns
``None`` and the radix sweeps run as without a bracket: the same thresholds either way, exactly.
"""

from __future__ import annotations

import torch

from clpeft.merging import fused_cpu
from clpeft.merging.methods.sparsify import bracket_ranks
from clpeft.merging.registry import ModelShape

__all__ = ["ModelBracket"]

_RUN = 16  # consecutive entries per sampled run (one cache line of float32)
_MIN_SAMPLE, _MAX_SAMPLE = 1 << 14, 1 << 20
_BAND_BYTES = 256 << 20  # every task's band together


class ModelBracket:
    """The sample and band sweeps of one whole-model selection (see the module docstring).

    Args:
        k: rank of the threshold from the largest, ``0 < k < shape.numel``.
        shape: the model's size and number of tasks (float32 on the CPU).
    """

    def __init__(self, k: int, shape: ModelShape):
        self.k, self.shape = k, shape
        runs = _sample_size(shape.numel) // _RUN
        self._stride = shape.numel // runs
        self._runs = runs
        self._sampling = True
        self._offset = 0  # position of the next tensor in the concatenated model
        self._samples: list[list[torch.Tensor]] = [[] for _ in range(shape.num_tasks)]
        self._lowers: list[int] = []
        self._uppers: list[int] = []
        tasks = shape.num_tasks
        self._capacity = _BAND_BYTES // 4 // tasks
        self._bands: list[torch.Tensor] = []
        self._found = torch.zeros(tasks, dtype=torch.int64)
        self._tally = torch.zeros(tasks, 3, dtype=torch.int64)  # above the bracket, at its upper end, at its lower end

    @classmethod
    def applies(cls, k: int, shape: ModelShape) -> bool:
        """Whether to try: float32 on the CPU with the compiled loops, a model large enough to sample
        and an expected band well inside the memory the bands may take."""
        if shape.dtype != torch.float32 or shape.device.type != "cpu" or not fused_cpu.available() or shape.numel < 32 * _MIN_SAMPLE:
            return False
        sample = _sample_size(shape.numel)
        upper, lower = bracket_ranks(k, sample, shape.numel)
        band = (lower - upper) * shape.numel / sample  # entries expected inside the bracket
        return 4 * band <= _BAND_BYTES // 4 // shape.num_tasks

    @property
    def sampling(self) -> bool:
        """Whether the current sweep is the sample's (else the band's)."""
        return self._sampling

    def observe(self, rows: torch.Tensor) -> bool:
        """One tensor's formed ``(K, n)`` task vectors; ``False`` where they are not float32 CPU rows."""
        if not fused_cpu.supports_selection(rows):
            return False
        if self._sampling:
            local = self._sampled(rows.shape[1])
            for samples, row in zip(self._samples, rows):
                samples.append(row[local].abs())
        else:
            fused_cpu.band_magnitudes(rows, self._lowers, self._uppers, self._bands, self._found, self._tally)
        return True

    def observe_differences(self, sources: list[torch.Tensor], base: torch.Tensor) -> None:
        """:meth:`observe` of ``sources[t] - base`` without forming them (the caller checked
        :func:`~clpeft.merging.fused_cpu.supports_difference_counts`)."""
        if self._sampling:
            local = self._sampled(base.numel())
            picked = base[local]
            for samples, source in zip(self._samples, sources):
                samples.append((source[local].float() - picked).abs())  # the compiled subtraction's values
        else:
            fused_cpu.band_magnitudes(sources, self._lowers, self._uppers, self._bands, self._found, self._tally, base=base)

    def _sampled(self, n: int) -> torch.Tensor:
        """This tensor's entries of the model's sample: those whose position in the concatenated model
        lies in a run of ``_RUN`` starting at a multiple of the stride (the first ``runs`` of them)."""
        first, stop = self._offset, self._offset + n
        self._offset = stop
        runs = torch.arange(first // self._stride, min(self._runs, -(-stop // self._stride)))
        positions = (runs[:, None] * self._stride + torch.arange(_RUN)).reshape(-1)
        return positions[(positions >= first) & (positions < stop)] - first

    def end_sample(self) -> None:
        """Bracket each task's answer from its sample; the next sweep is the band's."""
        for samples in self._samples:
            magnitudes = torch.cat(samples)
            m = magnitudes.numel()
            upper, lower = bracket_ranks(self.k, m, self.shape.numel)
            self._uppers.append(_bits(magnitudes.kthvalue(m - upper).values) if upper >= 0 else 0x7FFFFFFF)
            self._lowers.append(_bits(magnitudes.kthvalue(m - lower).values) if lower < m else 0)
        self._samples = []
        self._bands = [torch.empty(self._capacity) for _ in self._lowers]
        self._sampling, self._offset = False, 0

    def resolve(self) -> torch.Tensor | None:
        """After the band sweep: each task's exact k-th largest magnitude (float32, ``(K,)``), or
        ``None`` if one of them fell outside its bracket or its band did not fit."""
        thresholds = []
        for t, band in enumerate(self._bands):
            above, at_upper, at_lower = self._tally[t].tolist()
            inside = int(self._found[t])
            rank = self.k - above  # the answer's rank from the top of the bracket
            if rank < 1:
                return None
            if rank <= at_upper:
                thresholds.append(_float(self._uppers[t]))
            elif rank - at_upper <= inside:
                if inside > band.numel():
                    return None
                thresholds.append(fused_cpu.kth_largest_magnitude(band[:inside], rank - at_upper))
            elif self._lowers[t] != self._uppers[t] and rank - at_upper - inside <= at_lower:
                thresholds.append(_float(self._lowers[t]))
            else:
                return None
        self._bands = []
        return torch.stack(thresholds)


def _bits(magnitude: torch.Tensor) -> int:
    return int(magnitude.view(torch.int32))


def _float(bits: int) -> torch.Tensor:
    return torch.tensor(bits, dtype=torch.int32).view(torch.float32)


def _sample_size(numel: int) -> int:
    """Entries in the sample of a model of ``numel``: ``numel / 512``, within 2^14 and 2^20 (as the per-tensor C bracket)."""
    return min(max(numel // 512, _MIN_SAMPLE), _MAX_SAMPLE)
