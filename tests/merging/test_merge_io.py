"""Reading checkpoints tensor by tensor and writing safetensors incrementally."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from clpeft.errors import UserError
from clpeft.merging.io import (
    SafetensorsSource,
    SafetensorsWriter,
    StateDictSource,
    TensorInfo,
    checkpoint_files,
    open_checkpoint,
)
from clpeft.merging.output import atomic_output

TENSORS = {
    "f32": torch.randn(5, 7),
    "bf16": torch.randn(3, 4).to(torch.bfloat16),
    "f16": torch.randn(9).to(torch.float16),
    "f64": torch.randn(2, 2, 2, dtype=torch.float64),
    "i64": torch.arange(6).reshape(2, 3),
    "bool": torch.tensor([True, False, True]),
    "scalar": torch.tensor(2.5),
    "empty": torch.zeros(0, 4),
}


def test_writer_output_reads_back_bit_identical_with_safe_open(tmp_path):
    path = tmp_path / "out.safetensors"
    with atomic_output(path) as f:
        writer = SafetensorsWriter(f, [(n, TensorInfo(t.dtype, tuple(t.shape))) for n, t in TENSORS.items()], {"note": "x"})
        for name, tensor in TENSORS.items():
            writer.write(name, tensor)
        writer.finish()
    with safe_open(path, "pt") as f:
        assert f.metadata() == {"note": "x"}
        assert set(f.keys()) == set(TENSORS)
        for name, tensor in TENSORS.items():
            loaded = f.get_tensor(name)
            assert loaded.dtype == tensor.dtype and loaded.shape == tensor.shape
            assert torch.equal(loaded.reshape(-1).view(torch.uint8), tensor.reshape(-1).view(torch.uint8))


def test_source_reads_what_safetensors_wrote(tmp_path):
    save_file(TENSORS, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with SafetensorsSource([tmp_path / "model.safetensors"]) as source:
        assert set(source.keys()) == set(TENSORS)
        assert source.metadata() == {"format": "pt"}
        for name, tensor in TENSORS.items():
            assert source.info(name) == TensorInfo(tensor.dtype, tuple(tensor.shape))
            assert torch.equal(source.read(name), tensor)


def test_flat_is_the_view_typed_without_a_copy(tmp_path):
    """``flat``: each tensor flat in its own dtype, at the address of ``view``'s bytes, for files and
    state dicts alike (what the engine reads on the host)."""
    save_file(TENSORS, tmp_path / "model.safetensors")
    with SafetensorsSource([tmp_path / "model.safetensors"]) as files:
        for source in (files, StateDictSource(TENSORS, "a state dict")):
            for name, tensor in TENSORS.items():
                flat, raw = source.flat(name), source.view(name)
                assert flat.dtype == tensor.dtype and flat.shape == (tensor.numel(),)
                assert torch.equal(flat.view(torch.uint8), tensor.reshape(-1).view(torch.uint8))
                assert flat.numel() == 0 or flat.data_ptr() == raw.data_ptr()
    assert StateDictSource(TENSORS, "a state dict").flat("f32").data_ptr() == TENSORS["f32"].data_ptr()


def test_shards_through_an_index_and_a_directory(tmp_path):
    save_file({"a": torch.ones(2)}, tmp_path / "model-00001-of-00002.safetensors")
    save_file({"b": torch.zeros(3)}, tmp_path / "model-00002-of-00002.safetensors")
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    assert len(checkpoint_files(tmp_path / "model.safetensors.index.json")) == 2
    with open_checkpoint(tmp_path) as source:
        assert sorted(source.keys()) == ["a", "b"]
        assert torch.equal(source.read("b"), torch.zeros(3))


def test_a_run_directory_resolves_to_its_newest_checkpoint(tmp_path):
    for step in ("exp_000", "exp_001"):
        (tmp_path / "checkpoints" / step).mkdir(parents=True)
        save_file({"w": torch.full((2,), float(step[-1]))}, tmp_path / "checkpoints" / step / "model.safetensors")
    with open_checkpoint(tmp_path) as source:
        assert source.read("w").tolist() == [1.0, 1.0]


def test_truncated_file_is_reported_with_its_name(tmp_path):
    path = tmp_path / "cut.safetensors"
    save_file({"w": torch.randn(100)}, path)
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(UserError, match="cut.safetensors is truncated: tensor 'w'"):
        open_checkpoint(path)


@pytest.mark.parametrize("content", [b"", b"not a safetensors file at all", b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}      "])
def test_garbage_is_reported_with_the_file_name(tmp_path, content):
    path = tmp_path / "garbage.safetensors"
    path.write_bytes(content)
    with pytest.raises(UserError, match="garbage.safetensors"):
        open_checkpoint(path)


def test_missing_checkpoint(tmp_path):
    with pytest.raises(UserError, match="checkpoint not found"):
        open_checkpoint(tmp_path / "nope.safetensors")
    with pytest.raises(UserError, match="no safetensors checkpoint"):
        open_checkpoint(tmp_path)


def test_atomic_output_leaves_nothing_on_error(tmp_path):
    path = tmp_path / "out.bin"
    with pytest.raises(RuntimeError), atomic_output(path) as f:
        f.write(b"partial")
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_a_run_directory_may_hold_checkpoint_files(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "exp_001.pt").write_bytes(b"not ours")
    for step in ("adapters_exp_000", "adapters_exp_001"):
        save_file({"w": torch.full((2,), float(step[-1]))}, tmp_path / "checkpoints" / f"{step}.safetensors")
    assert checkpoint_files(tmp_path) == [tmp_path / "checkpoints" / "adapters_exp_001.safetensors"]
