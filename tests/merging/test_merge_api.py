"""merge() and merge_files(): streaming equals in-memory, the report, and bad input."""

from __future__ import annotations

import json
import time

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from clpeft.errors import UserError
from clpeft.merging import merge, merge_files
from clpeft.merging.blocks import BLOCK_COLUMNS as _BLOCK_COLUMNS
from clpeft.merging.engine import MergeEngine
from clpeft.merging.io import StateDictSource
from clpeft.merging.registry import get_method
from clpeft.merging.rules import MergeRules, plan

CASES = [
    ("task_arithmetic", {"scale": 0.4, "weights": [1.0, 0.5, 2.0]}),
    ("ties", {"density": 0.2}),
    ("ties", {"density": 0.5, "trim": "topk", "trim_scope": "tensor"}),
    ("ties", {"density": 0.3, "trim_scope": "tensor", "disjoint": "sum"}),
    ("dare", {"drop_rate": 0.7, "consensus": "ties"}),
    ("mean", {}),
]


@pytest.mark.parametrize(("method", "params"), CASES)
def test_streaming_equals_in_memory_bitwise_and_reads_back_with_safe_open(tmp_path, models, model_files, method, params):
    base, finetuned = models
    expected = merge(base, finetuned, method, seed=1, **params)
    base_path, paths = model_files
    report = merge_files(base_path, paths, tmp_path / "merged.safetensors", method, seed=1, **params)
    with safe_open(tmp_path / "merged.safetensors", "pt") as f:
        assert set(f.keys()) == set(expected)
        for name, tensor in expected.items():
            streamed = f.get_tensor(name)
            assert streamed.dtype == tensor.dtype
            assert torch.equal(streamed.view(-1).view(torch.uint8), tensor.view(-1).view(torch.uint8)), name
    assert len(report.tensors) == len(expected)


@pytest.mark.parametrize(("method", "params"), [CASES[0], CASES[1], CASES[5]])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merging_into_given_tensors_writes_the_same_bits_there(models, method, params, dtype):
    """``merge(out=...)`` writes into the given tensors (no new output memory; copied tensors too)
    the bits a merge into fresh tensors gives, for linear and non-linear methods and bf16."""
    base = {n: t.to(dtype) if t.is_floating_point() else t for n, t in models[0].items()}
    finetuned = [{n: t.to(dtype) if t.is_floating_point() else t for n, t in m.items()} for m in models[1]]
    rules = {"keep_base": ["head.*"]}
    expected = merge(base, finetuned, method, rules=rules, **params)
    out = {name: torch.full_like(t, 7) for name, t in expected.items()}  # a stale earlier result
    addresses = {name: t.data_ptr() for name, t in out.items()}
    merged = merge(base, finetuned, method, rules=rules, out=out, **params)
    assert set(merged) == set(expected) and {n: t.data_ptr() for n, t in merged.items()} == addresses
    for name, tensor in expected.items():
        assert torch.equal(out[name].view(-1).view(torch.uint8), tensor.view(-1).view(torch.uint8)), name
    assert torch.equal(out["head.weight"], base["head.weight"])  # copied from the base into out


def test_merging_into_given_tensors_checks_them(models):
    base, finetuned = models
    out = {name: t.clone() for name, t in base.items()}
    merge(base, finetuned, "mean", out=out)
    wrong = [
        ({**out, "pos_embed": out["pos_embed"].double()}, r"out: 'pos_embed' is a cpu tensor of shape .* and dtype torch.float64"),
        ({**out, "pos_embed": out["pos_embed"][..., :3]}, r"out: 'pos_embed' is a cpu tensor of shape"),
        ({**out, "head.weight": out["head.weight"].t()}, r"out: 'head.weight' is a cpu tensor .*: give a contiguous CPU tensor"),
        ({n: t for n, t in out.items() if n != "head.bias"}, r"out: has no tensor 'head.bias'"),
        ({**out, "head.bias": base["head.bias"]}, r"out: 'head.bias' shares memory with an input"),
        ({**out, "head.bias": finetuned[2]["head.bias"][:]}, r"out: 'head.bias' shares memory with an input"),
    ]
    for bad, message in wrong:
        with pytest.raises(UserError, match=message):
            merge(base, finetuned, "mean", out=bad)
    with pytest.raises(UserError, match="out: adamerging merges the whole model and returns new tensors"):
        merge(base, finetuned, "adamerging", out=out)


def test_merged_tensors_are_base_plus_merged_task_vector(models):
    base, finetuned = models
    merged = merge(base, finetuned, "task_arithmetic", scale=0.5)
    name = "blocks.1.mlp.fc2.weight"
    torch.testing.assert_close(merged[name], base[name] + 0.5 * sum(m[name] - base[name] for m in finetuned), rtol=0, atol=1e-6)
    assert torch.equal(merged["bn.num_batches_tracked"], base["bn.num_batches_tracked"])  # integer buffer: the base's


@pytest.mark.parametrize("progress", ["always", "never"])
def test_progress_bar_counts_every_byte_written_on_stderr(tmp_path, model_files, capsys, progress):
    base_path, paths = model_files
    merge_files(base_path, paths, tmp_path / "merged.safetensors", "mean", progress=progress)
    captured = capsys.readouterr()
    assert captured.out == ""
    if progress == "never":
        assert captured.err == ""
    else:
        from safetensors import safe_open

        with safe_open(tmp_path / "merged.safetensors", "pt") as f:
            total = sum(f.get_tensor(name).nbytes for name in f.keys())
        from tqdm import tqdm

        size = tqdm.format_sizeof(total)
        last = captured.err.replace("\r", "\n").strip().splitlines()[-1]
        assert last.startswith("mean merge: 100%") and f"{size}/{size}" in last, last


def test_report_json(tmp_path, model_files):
    base_path, paths = model_files
    merge_files(base_path, paths, tmp_path / "merged.safetensors", "ties", density=0.2)
    report = json.loads((tmp_path / "merged.report.json").read_text())
    assert report["method"] == "ties" and report["parameters"]["density"] == 0.2
    tensors = {t["name"]: t for t in report["tensors"]}
    fc1 = tensors["blocks.0.mlp.fc1.weight"]
    assert fc1["merged"] and len(fc1["task_vector_norms"]) == 3
    assert 0.05 < fc1["density"] < 0.5  # trimmed to 20% per task, union over 3 tasks minus conflicts
    assert 0.3 < fc1["sign_conflict"] < 0.9  # independent noise: signs disagree often
    assert tensors["bn.num_batches_tracked"]["merged"] is False
    assert report["summary"]["copied_from_base"] == 1


def test_transfer_path_packs_batches_and_gives_the_same_result(models):
    """The device path (packed batches, one copy per batch, look-ahead) run on the CPU."""
    base, finetuned = models
    sources = [StateDictSource(m, f"model {i}") for i, m in enumerate(finetuned)]
    base_source = StateDictSource(base, "base")
    jobs = plan(base_source, sources, MergeRules())
    results = []
    for transfer in (False, True):
        engine = MergeEngine(
            get_method("ties"),
            get_method("ties").validate({"density": 0.3}),  # trim_scope: model, so pass 1 takes this path too
            base_source,
            sources,
            batch_bytes=4096,
        )
        engine._transfer = transfer
        out = {}
        engine.run(jobs, lambda job, t: out.__setitem__(job.name, t.clone()))
        results.append(out)
    assert all(torch.equal(results[0][n], results[1][n]) for n in results[0])


@pytest.mark.parametrize(("method", "params"), [("task_arithmetic", {"scale": 0.4}), ("ties", {"density": 0.3, "trim_scope": "tensor"})])
def test_overlapped_batches_hand_the_sink_intact_outputs_in_order(models, method, params):
    """File merges compute batch i + 1 in a worker thread while the sink consumes batch i, the two
    alternating between output buffers. With many small batches, every tensor the sink sees (and
    copies during its call) must equal the one-thread merge's, in the same order."""
    base, finetuned = models
    spec = get_method(method)
    params = spec.validate(params)
    base_source = StateDictSource(base, "base")
    sources = [StateDictSource(m, f"model {i}") for i, m in enumerate(finetuned)]
    jobs = plan(base_source, sources, MergeRules())
    seen = []
    for overlap in (False, True):
        engine = MergeEngine(spec, params, base_source, sources, batch_bytes=512, overlap_writes=overlap)
        out: dict[str, torch.Tensor] = {}

        def slow_sink(job, tensor, out=out):
            time.sleep(0.003)  # a slow write: the worker has long computed the next batch meanwhile
            out[job.name] = tensor.clone()

        engine.run(jobs, slow_sink)
        seen.append(out)
    assert len(jobs) > 8 and list(seen[0]) == list(seen[1]) == [job.name for job in jobs]
    assert all(torch.equal(seen[0][n], seen[1][n]) for n in seen[0])


@pytest.mark.parametrize(("method", "params"), [("task_arithmetic", {"scale": 0.3, "weights": [1.0, -0.5, 2.0]}), ("mean", {})])
def test_linear_methods_in_column_blocks_equal_the_whole_tensor_path(method, params):
    """On the CPU linear methods form the task vectors one block of columns at a time. A tensor of
    several blocks (the last one partial) with bf16 fine-tunes over an fp32 base gives the merged
    tensor of a float64 computation, and the report of the whole-tensor path (the device path,
    run on the CPU): equal sign conflict and density, norms within fp32 accumulation of float64's."""
    generator = torch.Generator().manual_seed(0)
    n = 2 * _BLOCK_COLUMNS + 12345
    base = {"w": torch.randn(n, generator=generator), "b": torch.randn(7, generator=generator)}
    finetuned = [{k: (v + 0.01 * torch.randn(v.shape, generator=generator)).to(torch.bfloat16) for k, v in base.items()} for _ in range(3)]
    spec = get_method(method)
    params = spec.validate(params)
    base_source = StateDictSource(base, "base")
    sources = [StateDictSource(m, f"model {i}") for i, m in enumerate(finetuned)]
    jobs = plan(base_source, sources, MergeRules())
    outputs, reports = [], []
    for transfer in (False, True):
        engine = MergeEngine(spec, params, base_source, sources)
        engine._transfer = transfer
        out = {}
        reports.append({r.name: r for r in engine.run(jobs, lambda job, t: out.__setitem__(job.name, t.clone()))})
        outputs.append(out)
    coefficients = torch.tensor(spec.coefficients(3, params), dtype=torch.float64)
    for name, b in base.items():
        task_vectors = torch.stack([m[name].double() - b.double() for m in finetuned])
        expected = b.double() + coefficients @ task_vectors
        for out in outputs:
            torch.testing.assert_close(out[name].double(), expected, rtol=0, atol=1e-6)
        blocked, whole = reports[0][name], reports[1][name]
        for report in (blocked, whole):  # fp32 sums of squares over 2^19 entries: ~3e-6 relative
            torch.testing.assert_close(report.task_vector_norms, task_vectors.norm(dim=1).tolist(), rtol=1e-5, atol=0)
            assert report.merged_norm == pytest.approx((expected - b.double()).norm().item(), rel=1e-5)
        assert blocked.sign_conflict == whole.sign_conflict and 0.5 < blocked.sign_conflict < 0.9
        assert blocked.density == whole.density == 1.0


def test_rules_skip_and_keep_base(models):
    base, finetuned = models
    for m in finetuned:
        m["head.weight"] = torch.randn(20, 16)  # task-specific heads with another number of classes
    with pytest.raises(UserError, match=r"'head.weight' has shape \[20, 16\] in model 0 but \[10, 16\]"):
        merge(base, finetuned, "ties")
    merged = merge(base, finetuned, "ties", rules={"skip": ["head.weight"], "keep_base": ["head.*"]})
    assert "head.weight" not in merged
    assert torch.equal(merged["head.bias"], base["head.bias"])


def test_missing_and_unexpected_tensors(models):
    base, finetuned = models
    del finetuned[1]["pos_embed"]
    with pytest.raises(UserError, match="'pos_embed' is missing from model 1; add it to keep_base"):
        merge(base, finetuned, "task_arithmetic")
    merge(base, finetuned, "task_arithmetic", rules={"keep_base": ["pos_embed"]})
    finetuned[2]["extra.weight"] = torch.zeros(3)
    with pytest.raises(UserError, match="'extra.weight' of model 2 is not in the base"):
        merge(base, finetuned, "task_arithmetic", rules={"keep_base": ["pos_embed"]})


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_values_name_the_tensor_and_leave_no_output(tmp_path, models, bad):
    base, finetuned = models
    finetuned[2]["blocks.1.attn.proj.weight"][3, 4] = bad
    with pytest.raises(UserError, match="'blocks.1.attn.proj.weight' of model 2 holds NaN"):
        merge(base, finetuned, "ties")
    save_file(base, tmp_path / "base.safetensors")
    for i, m in enumerate(finetuned):
        save_file(m, tmp_path / f"m{i}.safetensors")
    paths = [tmp_path / f"m{i}.safetensors" for i in range(3)]
    with pytest.raises(UserError, match=r"'blocks.1.attn.proj.weight' of .*m2.safetensors holds NaN"):
        merge_files(tmp_path / "base.safetensors", paths, tmp_path / "out.safetensors", "task_arithmetic")
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "base.safetensors",
        "m0.safetensors",
        "m1.safetensors",
        "m2.safetensors",
    ]


def test_unreadable_or_truncated_input_leaves_no_output(tmp_path, model_files):
    base_path, paths = model_files
    paths[1].write_bytes(paths[1].read_bytes()[:-100])
    with pytest.raises(UserError, match="finetuned_1.safetensors is truncated"):
        merge_files(base_path, paths, tmp_path / "out.safetensors", "ties")
    paths[1].write_bytes(b"\x00" * 3)
    with pytest.raises(UserError, match="finetuned_1.safetensors is not a safetensors file"):
        merge_files(base_path, paths, tmp_path / "out.safetensors", "ties")
    assert not any(p.name.startswith(("out", ".out")) for p in tmp_path.iterdir())


def test_bad_method_and_parameters(models, tmp_path):
    base, finetuned = models
    with pytest.raises(UserError, match="unknown merge method 'tie'; did you mean 'ties'"):
        merge(base, finetuned, "tie")
    with pytest.raises(UserError, match="parameters.densty: unknown parameter .* did you mean 'density'"):
        merge(base, finetuned, "ties", densty=0.2)
    with pytest.raises(UserError, match="parameters.density: input should be less than or equal to 1"):
        merge(base, finetuned, "ties", density=2.0)
    with pytest.raises(UserError, match="parameters.weights: has 2 entries for 3 models"):
        merge(base, finetuned, "task_arithmetic", weights=[1.0, 2.0])
    with pytest.raises(UserError, match="needs the model and data"):
        merge_files(tmp_path / "b", [tmp_path / "m"], tmp_path / "o", "adamerging")
    with pytest.raises(UserError, match="CUDA is not available"):
        merge(base, finetuned, "mean", device="cuda") if not torch.cuda.is_available() else pytest.skip("CUDA present")


def test_fused_false_keeps_linear_merges_off_the_one_pass_kernel(monkeypatch):
    """``fused`` is a parameter (was the CLPEFT_FUSED_MERGE environment switch): with the kernel's
    conditions forced true, ``fused=True`` takes it and ``fused=False`` merges op by op, equally."""
    import torch

    from clpeft.merging import fused, merge
    from clpeft.merging.engine import MergeEngine

    calls = []
    monkeypatch.setattr(fused, "supports", lambda device, base, sources: True)
    monkeypatch.setattr(fused, "linear_merge", lambda *args: calls.append(1) or (_ for _ in ()).throw(RuntimeError("kernel")))
    init = MergeEngine.__init__

    def on_the_device_path(self, *args, **kwargs):  # the device path, on the CPU
        init(self, *args, **kwargs)
        self._transfer = True

    monkeypatch.setattr(MergeEngine, "__init__", on_the_device_path)
    base = {"w": torch.zeros(4, 4)}
    finetuned = [{"w": torch.ones(4, 4)}, {"w": 2 * torch.ones(4, 4)}]
    merged = merge(base, finetuned, "task_arithmetic", scale=0.5, fused=False)
    assert calls == [] and torch.equal(merged["w"], torch.full((4, 4), 1.5))
    with pytest.raises(RuntimeError, match="kernel"):
        merge(base, finetuned, "task_arithmetic", scale=0.5, fused=True)
    assert calls == [1]


def test_the_reports_non_zero_count_equals_torchs_across_blocks():
    """The density's count (byte sums over blocks of 2^20 entries on the CPU) is ``torch.count_nonzero``'s:
    NaN and infinities count, both zeros do not, blocks and a tail of 5 add up, shapes are flattened."""
    from clpeft.merging.report import count_nonzero

    values = torch.randn(2 * (1 << 20) + 5, generator=torch.Generator().manual_seed(0))
    values[torch.rand(values.shape, generator=torch.Generator().manual_seed(1)) < 0.4] = 0.0
    values[1::97] = -0.0
    values[:3] = torch.tensor([float("nan"), float("inf"), -float("inf")])
    for tensor in (values, values[:-5].view(2, -1), values[:7], values[:0]):
        assert int(count_nonzero(tensor)) == int(torch.count_nonzero(tensor))
