"""Which memory a tensor lives in (clpeft/merging/mappings.py): the merge engine reads two
fine-tunes per pass of the compiled linear merge over anonymous memory only."""

from __future__ import annotations

import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from clpeft.merging import fused_cpu, merge
from clpeft.merging.mappings import MemoryMap

linux = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/maps")


def test_ranges_without_an_inode_are_anonymous_and_adjacent_ones_join(tmp_path):
    maps = tmp_path / "maps"
    maps.write_text(
        "1000-2000 rw-p 00000000 00:00 0 \n"
        "2000-3000 rw-p 00000000 00:00 0                          [heap]\n"  # joins the one before
        "3000-4000 r--p 00000000 fe:00 2450951                    /ckpt/model.safetensors\n"
        "4000-5000 rw-p 00000000 00:00 0 \n"
        "6000-7000 rw-p 00000000 00:00 0 \n"  # a gap at 5000
    )
    memory = MemoryMap.read(str(maps))
    at = _FakeTensor
    assert memory.anonymous(at(0x1800, 0x1000))  # spans the joined pair
    assert memory.anonymous(at(0x4000, 0x1000))  # exactly one range
    assert not memory.anonymous(at(0x3000, 0x10))  # a file mapping
    assert not memory.anonymous(at(0x4800, 0x1000))  # runs into the gap
    assert not memory.anonymous(at(0x800, 0x10))  # below every range
    assert not memory.anonymous(at(0x1000, 0x10), at(0x3000, 0x10))  # every tensor must be anonymous


def test_an_unreadable_map_calls_nothing_anonymous(tmp_path):
    assert not MemoryMap.read(str(tmp_path / "missing")).anonymous(torch.ones(4))


@linux
def test_this_process_tensors_are_anonymous_and_loaded_checkpoints_are_not(tmp_path):
    made = torch.randn(100_000)
    save_file({"t": made}, str(tmp_path / "t.safetensors"))
    loaded = load_file(str(tmp_path / "t.safetensors"))["t"]
    memory = MemoryMap.read()
    assert memory.anonymous(made, torch.ones(3))
    assert not memory.anonymous(loaded)
    assert not memory.anonymous(made, loaded)


@linux
@pytest.mark.skipif(not fused_cpu.available(), reason="no C compiler: the kernel is not built")
def test_the_engine_pairs_fine_tunes_in_anonymous_memory_only(tmp_path, monkeypatch):
    generator = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(50_000, generator=generator).bfloat16()}
    models = [{"w": (base["w"].float() + 0.01 * torch.randn(50_000, generator=generator)).bfloat16()} for _ in range(3)]
    for i, state in enumerate([base, *models]):
        save_file(state, str(tmp_path / f"{i}.safetensors"))
    loaded = [load_file(str(tmp_path / f"{i}.safetensors")) for i in range(4)]
    layouts = []
    linear_merge = fused_cpu.linear_merge
    monkeypatch.setattr(fused_cpu, "linear_merge", lambda *args, **kwargs: layouts.append(kwargs["pairs"]) or linear_merge(*args, **kwargs))
    in_process = merge(base, models, "task_arithmetic", scale=0.3)
    from_files = merge(loaded[0], loaded[1:], "task_arithmetic", scale=0.3)
    assert layouts == [True, False]
    assert torch.equal(in_process["w"].view(torch.int16), from_files["w"].view(torch.int16))


class _FakeTensor:
    """What MemoryMap.anonymous reads of a tensor: its address and size."""

    def __init__(self, address: int, nbytes: int):
        self._address, self.nbytes = address, nbytes

    def data_ptr(self) -> int:
        return self._address
