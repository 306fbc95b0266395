"""Which memory a tensor's bytes live in: anonymous memory or a file mapping.

The compiled linear merge (:func:`~clpeft.merging.fused_cpu.linear_merge`) can read two
fine-tunes per pass over a chunk, which halves its delta row's traffic: 1.3x faster in bf16 on
anonymous memory (tensors trained or cloned in the process), but 1.5x slower on the mappings of
checkpoints whose page cache is in 2 MiB folios, where two streams at equal offsets of physically
contiguous pages conflict (benchmarks/RESULTS.md, "bf16 in memory"). The merge engine asks
:meth:`MemoryMap.anonymous` once per tensor and reads the process's mappings once per merge.
"""

from __future__ import annotations

import bisect

import torch

__all__ = ["MemoryMap"]


class MemoryMap:
    """The anonymous address ranges of this process (``/proc/self/maps``: mappings without an
    inode, adjacent ones joined), as sorted ``[start, end)`` pairs."""

    def __init__(self, anonymous: list[tuple[int, int]]):
        self._starts = [start for start, _ in anonymous]
        self._ends = [end for _, end in anonymous]

    @classmethod
    def read(cls, path: str = "/proc/self/maps") -> MemoryMap:
        """The process's mappings now; none anonymous where the file cannot be read (not Linux)."""
        try:
            with open(path) as maps:
                lines = maps.read().splitlines()
        except OSError:
            return cls([])
        ranges: list[tuple[int, int]] = []
        for line in lines:
            fields = line.split()
            if len(fields) < 5 or fields[4] != "0":  # fields[4]: the inode of a file mapping
                continue
            start, end = (int(address, 16) for address in fields[0].split("-"))
            if ranges and ranges[-1][1] == start:
                ranges[-1] = (ranges[-1][0], end)
            else:
                ranges.append((start, end))
        return cls(ranges)

    def anonymous(self, *tensors: torch.Tensor) -> bool:
        """Whether every tensor's bytes lie in anonymous memory (a CPU tensor's storage offset and
        size, as its ``data_ptr`` and ``nbytes`` give them)."""
        for tensor in tensors:
            start = tensor.data_ptr()
            index = bisect.bisect_right(self._starts, start) - 1
            if index < 0 or start + tensor.nbytes > self._ends[index]:
                return False
        return True
