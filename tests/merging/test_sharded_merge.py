"""Sharded, resumable merges (clpeft/merging/sharded.py) on a generated Llama-7B-shaped checkpoint.

The checkpoint has Llama-2-7B's layout (32 layers of q/k/v/o, gate/up/down and two norms, the
embedding, the final norm and the head) with every dimension divided by ``scale`` (128 here:
hidden 32, intermediate 86, vocab 250), saved as transformers saves it: numbered shards and a
``model.safetensors.index.json``. The slow test divides by 4 and measures peak RSS against
:func:`~clpeft.merging.sharded.rss_bound`.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from clpeft.errors import UserError
from clpeft.merging import merge_files
from clpeft.merging.io import TensorInfo, open_checkpoint
from clpeft.merging.sharded import INDEX_NAME, PROGRESS_NAME, parse_size, plan_shards, rss_bound

LLAMA_7B = {"hidden": 4096, "intermediate": 11008, "vocab": 32000, "layers": 32}


def llama_shapes(scale: int, layers: int = 32) -> dict[str, tuple[int, ...]]:
    """Llama-2-7B's tensor names and shapes with hidden, intermediate and vocab divided by ``scale``."""
    h, i, v = (LLAMA_7B[k] // scale for k in ("hidden", "intermediate", "vocab"))
    shapes = {"model.embed_tokens.weight": (v, h)}
    for n in range(layers):
        p = f"model.layers.{n}."
        shapes |= {p + f"self_attn.{m}_proj.weight": (h, h) for m in "qkvo"}
        shapes |= {p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h), p + "mlp.down_proj.weight": (h, i)}
        shapes |= {p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,)}
    return shapes | {"model.norm.weight": (h,), "lm_head.weight": (v, h)}


def save_sharded(directory: Path, state: dict[str, torch.Tensor], shards: int) -> Path:
    """``state`` as transformers saves a sharded checkpoint: numbered files and an index."""
    directory.mkdir(parents=True, exist_ok=True)
    names = list(state)
    size = -(-len(names) // shards)
    weight_map = {}
    for s in range(shards):
        file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = {n: state[n].contiguous() for n in names[s * size : (s + 1) * size]}
        save_file(part, directory / file, metadata={"format": "pt"})
        weight_map |= dict.fromkeys(part, file)
    total = sum(t.numel() * t.element_size() for t in state.values())
    (directory / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return directory


def llama_checkpoints(root: Path, scale: int, models: int = 2, dtype=torch.bfloat16, layers: int = 32):
    """A base and ``models`` fine-tunes (the base plus noise) as sharded directories; the fine-tunes
    are sharded differently from the base."""
    generator = torch.Generator().manual_seed(0)
    base = {n: (0.02 * torch.randn(s, generator=generator)).to(dtype) for n, s in llama_shapes(scale, layers).items()}
    paths = [save_sharded(root / "base", base, 3)]
    for k in range(models):
        tuned = {n: (t.float() + 1e-3 * torch.randn(t.shape, generator=generator)).to(dtype) for n, t in base.items()}
        paths.append(save_sharded(root / f"finetune_{k}", tuned, 2 + k))
        del tuned
    return paths[0], paths[1:]


def read_directory(directory: Path) -> dict[str, torch.Tensor]:
    index = json.loads((directory / INDEX_NAME).read_text())
    out = {}
    for file in dict.fromkeys(index["weight_map"].values()):
        out |= load_file(directory / file)
    assert set(out) == set(index["weight_map"])
    return out


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return llama_checkpoints(tmp_path_factory.mktemp("llama7b_shaped"), scale=128)


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert a[name].dtype == b[name].dtype and torch.equal(a[name], b[name]), name


# ------------------------------------------------------------------ layout


def test_parse_size_and_plan():
    assert parse_size("5G") == 5 * 10**9 and parse_size("500MB") == 5 * 10**8 and parse_size("2KiB") == 2048 and parse_size(77) == 77
    with pytest.raises(UserError, match="not a size"):
        parse_size("five gigs")
    infos = [("a", TensorInfo(torch.float32, (10,))), ("b", TensorInfo(torch.float32, (30,))), ("c", TensorInfo(torch.float32, (5,)))]
    assert plan_shards(infos, 100) == [[0], [1], [2]]  # 40 + 120 > 100; b alone is over the limit
    assert plan_shards(infos, 170) == [[0, 1], [2]]  # 160 + 20 > 170


@pytest.mark.parametrize("method", ["task_arithmetic", "ties"])
def test_sharded_output_equals_single_file_merge(tmp_path, llama, method):
    base, models = llama
    single = merge_files(base, models, tmp_path / "one.safetensors", method)
    report = merge_files(base, models, tmp_path / "sharded", method, shard_size="200KB")
    index = json.loads((tmp_path / "sharded" / INDEX_NAME).read_text())
    files = sorted((tmp_path / "sharded").glob("model-*.safetensors"))
    assert len(files) > 3 and {f.name for f in files} == set(index["weight_map"].values())
    assert all(f.stat().st_size - 8 - int.from_bytes(f.read_bytes()[:8], "little") <= 200_000 for f in files)  # data section
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in load_file(tmp_path / "one.safetensors").values())
    assert list(index["weight_map"]) == [t.name for t in single.tensors] == [t.name for t in report.tensors]
    assert_same(read_directory(tmp_path / "sharded"), load_file(tmp_path / "one.safetensors"))
    assert not (tmp_path / "sharded" / PROGRESS_NAME).exists()
    assert json.loads((tmp_path / "sharded" / "clpeft_merge_report.json").read_text())["resumed_shards"] == 0


def test_dtype_casts_the_output(tmp_path, llama):
    base, models = llama
    merge_files(base, models, tmp_path / "bf16", "task_arithmetic", shard_size="1MB")
    merge_files(base, models, tmp_path / "fp32", "task_arithmetic", shard_size="1MB", dtype="float32")
    wide = read_directory(tmp_path / "fp32")
    assert all(t.dtype == torch.float32 for t in wide.values())
    assert_same(wide, {n: t.float() for n, t in read_directory(tmp_path / "bf16").items()})
    with pytest.raises(UserError, match="not a floating dtype"):
        merge_files(base, models, tmp_path / "bad", "task_arithmetic", dtype="int8")


def test_refuses_to_write_over_an_input(tmp_path, llama):
    base, models = llama
    with pytest.raises(UserError, match="inside the input directory"):
        merge_files(base, models, models[0], "task_arithmetic")
    shard = tmp_path / "model-00001-of-00001.safetensors"  # an input file where the output's shard would go
    save_file(read_directory(models[0]), shard)
    with pytest.raises(UserError, match="is the same file as the input"):
        merge_files(base, [models[1], shard], tmp_path, "task_arithmetic", shard_size="1G")
    assert read_directory(models[0]).keys() == load_file(shard).keys()  # untouched


# ------------------------------------------------------------------ resume


class Interrupted(Exception):
    pass


def interrupt_after(shards: int):
    seen = []

    def on_shard(record):
        seen.append(record.file)
        if len(seen) == shards:
            raise Interrupted

    return on_shard


@pytest.mark.parametrize(("method", "params"), [("ties", {"density": 0.3}), ("dare", {"drop_rate": 0.5})])
def test_interrupted_merge_resumes_bit_for_bit(tmp_path, llama, method, params):
    """ties' default trim_scope: model needs a whole-model pass; dare draws per tensor from the seed."""
    base, models = llama
    merge_files(base, models, tmp_path / "whole", method, shard_size="100KB", **params)
    out = tmp_path / "resumed"
    with pytest.raises(Interrupted):
        merge_files(base, models, out, method, shard_size="100KB", on_shard=interrupt_after(2), **params)
    assert not (out / INDEX_NAME).exists() and len(json.loads((out / PROGRESS_NAME).read_text())["shards"]) == 2
    assert not list(out.glob(".*partial*"))  # the shard being written was removed
    kept = {f.name: f.stat().st_mtime_ns for f in out.glob("model-*.safetensors")}
    written = []
    report = merge_files(base, models, out, method, shard_size="100KB", resume=True, on_shard=lambda r: written.append(r.file), **params)
    assert len(kept) == 2 and not set(kept) & set(written) and len(written) > 1
    assert all((out / name).stat().st_mtime_ns == mtime for name, mtime in kept.items())  # kept, not rewritten
    assert json.loads((out / "clpeft_merge_report.json").read_text())["resumed_shards"] == 2
    assert [t.name for t in report.tensors] == list(json.loads((out / INDEX_NAME).read_text())["weight_map"])
    assert_same(read_directory(out), read_directory(tmp_path / "whole"))


def test_resume_redoes_a_damaged_shard(tmp_path, llama):
    base, models = llama
    out = tmp_path / "out"
    with pytest.raises(Interrupted):
        merge_files(base, models, out, "task_arithmetic", shard_size="100KB", on_shard=interrupt_after(3))
    second = sorted(out.glob("model-*.safetensors"))[1]
    data = bytearray(second.read_bytes())
    data[-1] ^= 1  # same size, another hash
    second.write_bytes(data)
    written = []
    merge_files(base, models, out, "task_arithmetic", shard_size="100KB", resume=True, on_shard=lambda r: written.append(r.file))
    assert written[0] == second.name  # shard 1 kept, 2 (damaged) and 3 redone
    merge_files(base, models, tmp_path / "whole", "task_arithmetic", shard_size="100KB")
    assert_same(read_directory(out), read_directory(tmp_path / "whole"))


def test_resume_refuses_changed_inputs_or_settings(tmp_path, llama):
    base, models = llama
    out = tmp_path / "out"
    with pytest.raises(Interrupted):
        merge_files(base, models, out, "ties", shard_size="100KB", on_shard=interrupt_after(1))
    with pytest.raises(UserError, match=r"cannot resume into .*the setting 'parameters' changed"):
        merge_files(base, models, out, "ties", density=0.5, shard_size="100KB", resume=True)
    with pytest.raises(UserError, match="the setting 'shard_size' changed"):
        merge_files(base, models, out, "ties", shard_size="1MB", resume=True)
    shard = sorted(models[1].glob("*.safetensors"))[0]
    os.utime(shard, ns=(shard.stat().st_atime_ns, shard.stat().st_mtime_ns + 10**9))
    try:
        with pytest.raises(UserError, match=r"model 1 \(.*finetune_1\) changed") as error:
            merge_files(base, models, out, "ties", shard_size="100KB", resume=True)
        assert "\n" not in str(error.value)
    finally:
        os.utime(shard, ns=(shard.stat().st_atime_ns, shard.stat().st_mtime_ns - 10**9))


_KILLED_MERGE = """
import os, signal, sys
from clpeft.merging import merge_files

def kill(record):
    os.kill(os.getpid(), signal.SIGKILL)  # no clean-up of any kind, as a crash or the OOM killer

merge_files(sys.argv[1], sys.argv[2:4], sys.argv[4], "ties", shard_size="100KB", on_shard=kill)
"""


def test_killed_merge_resumes_bit_for_bit(tmp_path, llama):
    base, models = llama
    out = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-c", _KILLED_MERGE, str(base), *map(str, models), str(out)], env=env, capture_output=True)
    assert run.returncode == -signal.SIGKILL, run.stderr.decode()[-2000:]
    merge_files(base, models, tmp_path / "whole", "ties", shard_size="100KB")
    names = sorted(f.name for f in (tmp_path / "whole").glob("model-*.safetensors"))
    assert [f.name for f in out.glob("model-*.safetensors")] == names[:1] and len(names) > 3
    assert not (out / INDEX_NAME).exists()
    written = []
    merge_files(base, models, out, "ties", shard_size="100KB", resume=True, on_shard=lambda r: written.append(r.file))
    assert written == names[1:]
    for name in json.loads((out / INDEX_NAME).read_text())["weight_map"].values():
        assert (out / name).read_bytes() == (tmp_path / "whole" / name).read_bytes()


# ------------------------------------------------------------------ memory

_MEASURED_MERGE = """
import json, sys, time
from pathlib import Path
import torch
from clpeft.merging import merge_files

def status(field):  # this process's own memory (ru_maxrss would include the parent's at fork)
    line = next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith(field))
    return int(line.split()[1]) * 1024

torch.ones(1).add_(1)  # torch's own start-up memory belongs to the baseline
Path("/proc/self/clear_refs").write_text("5")  # the peak (VmHWM) restarts from here
before = status("VmRSS:")
start = time.perf_counter()
merge_files(sys.argv[1], sys.argv[2].split(","), sys.argv[3], sys.argv[4], shard_size="1G")
seconds = time.perf_counter() - start
print(json.dumps({"baseline": before, "peak": status("VmHWM:"), "seconds": seconds}))
"""


CHECKPOINTS = {"layout_div4": (4, 32), "widths_4_layers": (1, 4)}  # (scale, layers)


@pytest.mark.slow
@pytest.mark.parametrize("checkpoint", list(CHECKPOINTS))
@pytest.mark.parametrize("method", ["task_arithmetic", "ties"])
def test_peak_rss_stays_within_the_stated_bound(tmp_path_factory, checkpoint, method):
    """The merge's peak RSS above its baseline stays under rss_bound on two bf16 checkpoints, three
    models each: Llama-7B's layout with every width / 4 (0.8 GB per model; the bound is a fraction of
    the inputs), and Llama-7B's real widths with 4 of its 32 layers (2.1 GB per model; its 262 MB
    embedding sets the bound)."""
    scale, layers = CHECKPOINTS[checkpoint]
    root = tmp_path_factory.getbasetemp() / checkpoint
    if not (root / "finetune_1" / INDEX_NAME).exists():
        llama_checkpoints(root, scale=scale, layers=layers)
    base, models = root / "base", [root / "finetune_0", root / "finetune_1"]
    with open_checkpoint(base) as source:
        infos = [source.info(k) for k in source.keys()]
    inputs = 3 * sum(i.nbytes for i in infos)
    bound = rss_bound(infos, len(models), linear=method == "task_arithmetic")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    argv = [sys.executable, "-c", _MEASURED_MERGE, str(base), ",".join(map(str, models)), str(tmp_path_factory.mktemp(method)), method]
    result = json.loads(subprocess.run(argv, env=env, capture_output=True, check=True, text=True).stdout)
    added = result["peak"] - result["baseline"]
    print(
        f"\n{checkpoint} {method}: inputs {inputs / 1e9:.2f} GB, peak RSS {result['peak'] / 1e9:.2f} GB "
        f"(+{added / 1e9:.3f} GB over the {result['baseline'] / 1e9:.2f} GB baseline; bound {bound / 1e9:.3f} GB), "
        f"{result['seconds']:.1f} s"
    )
    assert added <= bound
    assert checkpoint != "layout_div4" or bound < inputs / 2


def test_rss_bound_counts_the_largest_tensor():
    infos = [TensorInfo(torch.bfloat16, (1000, 10)), TensorInfo(torch.bfloat16, (10,))]
    slack = 32 << 20
    assert rss_bound(infos, 2, linear=True, batch_bytes=0) - slack == 3 * 20_000 + 20_000 + 4 * 40_000
    assert rss_bound(infos, 2, linear=False, batch_bytes=0) - slack == 3 * 20_000 + 20_000 + 8 * 40_000
    assert rss_bound(infos, 2, linear=True) - slack == 3 * (8 << 20) + 20_000 + 4 * 40_000  # small tensors read in 8 MiB batches


def run_cli(*argv: str) -> int:
    import argparse

    from clpeft.tools import merge_cli

    parser = argparse.ArgumentParser()
    merge_cli.configure_parser(parser)
    return merge_cli.run(parser.parse_args(list(argv)))


def test_cli_writes_a_directory_and_resumes(tmp_path, llama, capsys):
    base, models = llama
    flags = ["--base", str(base), "--models", *map(str, models), "--method", "task_arithmetic", "--shard-size", "100KB"]
    out = tmp_path / "out"
    with pytest.raises(Interrupted):
        merge_files(base, models, out, "task_arithmetic", scale=0.5, shard_size="100KB", on_shard=interrupt_after(2))
    assert run_cli(*flags, "--out", str(out), "--set", "scale=0.5", "--resume") == 0
    assert json.loads((out / "clpeft_merge_report.json").read_text())["resumed_shards"] == 2
    assert run_cli(*flags, "--out", str(tmp_path / "whole"), "--set", "scale=0.5") == 0
    assert_same(read_directory(out), read_directory(tmp_path / "whole"))
    with pytest.raises(UserError, match="need a directory as out"):
        run_cli(*flags, "--out", str(tmp_path / "one.safetensors"), "--resume")
