"""The one-pass CPU kernel for linear merges (clpeft/merging/fused_cpu.py, linear_merge.c).

The kernel promises the ATen path's bits: IEEE float32 operations rounded one by one, in the
order ``tau_k = theta_k - theta_0``, ``delta = c_1 tau_1 + c_2 tau_2 + ...`` (left to right),
``theta_0 + delta`` rounded once to the output dtype. The references below form exactly that
with torch's own float32 ops and conversions, and the statistics in float64.
"""

from __future__ import annotations

import logging
import math
import struct
import threading
import time

import pytest
import torch
from conftest import finetune, tiny_vit
from safetensors.torch import load_file, save_file

from clpeft.merging import fused_cpu, merge, merge_files

pytestmark = pytest.mark.skipif(not fused_cpu.available(), reason="no C compiler: the kernel is not built")

HALF_STEP = {torch.bfloat16: 2.0**-8, torch.float16: 2.0**-11}  # c = 1 + HALF_STEP: exact ties when rounding
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SEGMENT_BYTES = 1 << 19  # of each input per chunk of clpeft_linear_merge (linear_merge.c)
SUM_BLOCK = 16384  # entries whose statistics the kernel adds in float32


def chunk(dtype: torch.dtype) -> int:
    """Entries per chunk of clpeft_linear_merge for ``dtype``."""
    return SEGMENT_BYTES // dtype.itemsize


def inputs(n: int, k: int, dtype: torch.dtype, seed: int = 0) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A base spanning six decades and K fine-tunes near it; some entries unchanged, one model
    equal to the base (exact zeros in tau), one opposite to another (exact cancellation)."""
    generator = torch.Generator().manual_seed(seed)
    base = torch.randn(n, generator=generator) * torch.logspace(-4, 2, n)[torch.randperm(n, generator=generator)]
    sources = [base + torch.randn(n, generator=generator) * base.abs() * 0.05 for _ in range(k)]
    sources[0][::5] = base[::5]
    if k > 2:
        sources[2] = 2 * base - sources[1]
    if k > 3:
        sources[3] = base.clone()
    return base.to(dtype), [s.to(dtype) for s in sources]


def reference(base: torch.Tensor, sources: list[torch.Tensor], coefficients: list[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """The merged tensor by torch float32 ops in the kernel's order, and float64 statistics."""
    theta0 = base.float()
    task_vectors = [s.float() - theta0 for s in sources]
    weights = torch.tensor(coefficients, dtype=torch.float32)
    delta = weights[0] * task_vectors[0]
    for weight, task_vector in zip(weights[1:], task_vectors[1:]):
        delta = delta + weight * task_vector
    merged = (theta0 + delta).to(base.dtype)
    wide = [theta0.double(), delta.double()]
    sums = [wide[0].square().sum(), wide[1].square().sum(), (delta != 0).sum().double()]
    sums += [t.double().square().sum() for t in task_vectors]
    return merged, torch.stack(sums)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    integer = {4: torch.int32, 2: torch.int16}[a.element_size()]
    return a.dtype == b.dtype and torch.equal(a.view(integer), b.view(integer))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("k", [1, 4, 8, 11])  # 11: a group of eight models, then three
def test_kernel_equals_float32_ops_in_order_across_chunks_and_tails(dtype, k):
    n = 2 * chunk(dtype) + 16 * 5 + 7  # two whole chunks of the C loop, then pairs of vectors, then 7 single entries
    base, sources = inputs(n, k, dtype)
    coefficients = [0.3, -0.7, 1.0 + HALF_STEP.get(dtype, 2.0**-24), 0.25, 1.7, -0.05, 0.4, 2.5, -1.1, 0.6, 0.01][:k]
    out = torch.empty_like(base)
    sums, conflict = fused_cpu.linear_merge(base, sources, coefficients, out)
    expected, expected_sums = reference(base, sources, coefficients)
    assert same_bits(out, expected)
    assert conflict == fused_cpu.sign_conflict(base, sources).item()
    assert sums[2] == expected_sums[2]  # the non-zero count is exact
    torch.testing.assert_close(torch.tensor(sums, dtype=torch.float64), expected_sums, rtol=1e-6, atol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_rounding_to_half_precision_is_torchs(dtype):
    """Ties to even, subnormals, overflow to infinity and signed zeros round as torch rounds:
    with a zero base the merge is ``c * theta_1`` rounded once."""
    generator = torch.Generator().manual_seed(1)
    info = torch.finfo(dtype)
    magnitudes = torch.cat([torch.logspace(-45 if dtype == torch.bfloat16 else -8, 0, 400), torch.linspace(1, float(info.max), 400)])
    source = (magnitudes * torch.where(torch.rand(800, generator=generator) < 0.5, -1.0, 1.0)).to(dtype)
    source[:3] = torch.tensor([0.0, -0.0, float(info.smallest_normal)])
    base = torch.zeros_like(source)
    for c in [1.0 + HALF_STEP[dtype], 1.0 - HALF_STEP[dtype] / 2, 0.3, 3.0, -1.7]:
        out = torch.empty_like(source)
        fused_cpu.linear_merge(base, [source], [c], out)
        assert same_bits(out, reference(base, [source], [c])[0]), c


def test_bfloat16_nan_and_infinity_round_as_torch_rounds_in_every_chunk():
    """bf16 outputs round without NaN masks unless a chunk's base or delta is not finite; such a
    chunk is written again with them. NaN and inf in one chunk (vector body and scalar tail), a
    finite neighbour chunk, and a NaN coefficient whose payload the unmasked rounding would carry
    into the sign bit (0x7FFFFFFF -> -0.0)."""
    size = chunk(torch.bfloat16)
    n = 3 * size + 9  # chunks 0 and 1 hold NaN / inf, chunk 2 is finite, the 9-entry tail holds a NaN
    base, sources = inputs(n, 3, torch.bfloat16)
    base[5], sources[0][7], sources[1][size + 3], base[-2] = math.nan, math.inf, -math.inf, math.nan
    for coefficients in ([0.3, -0.7, 1.2], [0.3, -0.7, struct.unpack("<f", struct.pack("<I", 0x7FFFFFFF))[0]]):
        out = torch.empty_like(base)
        fused_cpu.linear_merge(base, sources, coefficients, out)
        expected = reference(base, sources, coefficients)[0]
        nan = expected.isnan()
        assert torch.equal(out.isnan(), nan)
        assert same_bits(out[~nan], expected[~nan])
    assert nan.all()  # the NaN coefficient reaches every entry


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [SUM_BLOCK + 37, SEGMENT_BYTES + 21])  # under a chunk of any dtype; over two of each
def test_output_off_a_32_byte_boundary_gets_the_same_bits(dtype, n):
    """An output of a chunk or more on a 32-byte boundary is written with non-temporal stores, any
    other with plain ones: the same bits and sums either way."""
    base, sources = inputs(n, 3, dtype, seed=2)
    coefficients = [0.4, -0.3, 1.1]
    aligned = torch.empty(n + 32, dtype=dtype)
    offset = -aligned.data_ptr() % 32 // dtype.itemsize
    results = {}
    for label, start in [("aligned", offset), ("off", offset + 1)]:
        out = aligned[start : start + n]
        assert (out.data_ptr() % 32 == 0) == (label == "aligned")
        results[label] = (*fused_cpu.linear_merge(base, sources, coefficients, out), out.clone())
    expected, expected_sums = reference(base, sources, coefficients)
    for sums, conflict, out in results.values():
        assert same_bits(out, expected)
        assert conflict == fused_cpu.sign_conflict(base, sources).item()
        torch.testing.assert_close(torch.tensor(sums, dtype=torch.float64), expected_sums, rtol=1e-6, atol=0)
    assert results["aligned"][:2] == results["off"][:2]


def test_results_do_not_depend_on_how_a_tensor_is_split_over_threads(monkeypatch):
    base, sources = inputs(5 * 4096 + 77, 3, torch.bfloat16)
    one = torch.empty_like(base)
    _, one_conflict = fused_cpu.linear_merge(base, sources, [0.5, 0.5, -0.3], one)
    monkeypatch.setattr(fused_cpu, "_MIN_ENTRIES_PER_THREAD", 1000)
    monkeypatch.setattr(torch, "get_num_threads", lambda: 7)
    assert len(fused_cpu._column_ranges(base.numel(), base.numel())) == 7  # parts of 2944 entries: sampled runs straddle them
    split = torch.empty_like(base)
    sums, conflict = fused_cpu.linear_merge(base, sources, [0.5, 0.5, -0.3], split)
    assert same_bits(split, one)
    assert 0 < conflict == one_conflict  # each sampled run counted once, by the part it starts in
    torch.testing.assert_close(torch.tensor(sums, dtype=torch.float64), reference(base, sources, [0.5, 0.5, -0.3])[1], rtol=1e-6, atol=0)


def test_share_runs_whole_tasks_concurrently_and_returns_their_results_in_order(monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: 3)
    together = threading.Barrier(3, timeout=30)  # broken (an error) unless three shares run at once
    seen = []

    def task(i: int, wait: bool):
        def call():
            if wait:
                together.wait()
            seen.append((i, threading.get_ident(), fused_cpu._threads_for(1 << 30)))
            return i * i

        return call

    unit = fused_cpu._MIN_SHARED_ENTRIES
    sizes = [900 * unit, 10 * unit, 20 * unit, 30 * unit, 40 * unit, 50 * unit, 60 * unit, unit - 1]
    results = fused_cpu.share([(size, task(i, wait=i in (4, 5, 6))) for i, size in enumerate(sizes)])
    assert results == [i * i for i in range(len(sizes))]
    # more than a third of the work, and too small to share: here, first, free to split
    assert seen[:2] == [(0, threading.get_ident(), 3), (7, threading.get_ident(), 3)]
    shared = {i: (thread, threads) for i, thread, threads in seen[2:]}
    assert {threads for _, threads in shared.values()} == {1}  # the others never split their tensor
    assert len({shared[i][0] for i in (4, 5, 6)}) == 3  # the three largest went to three threads
    assert shared[3][0] == shared[4][0] and shared[2][0] == shared[5][0]  # largest first, each to the lightest share
    assert fused_cpu._threads_for(1 << 30) == 3  # the flag ends with the call


def test_merges_running_at_once_on_two_threads_keep_their_own_rows(monkeypatch):
    """Each thread's calls have their own chunk rows (delta and base): two merges of several chunks
    each, started together, give the bits and sums each gives alone."""
    n, coefficients = 8 * chunk(torch.bfloat16) + 5, [0.5, -0.25, 1.5]
    cases = [inputs(n, 3, torch.bfloat16, seed=seed) for seed in (3, 4)]
    alone = []
    monkeypatch.setattr(torch, "get_num_threads", lambda: 1)  # whole, as share() runs them: the same sums
    for base, sources in cases:
        out = torch.empty_like(base)
        alone.append((fused_cpu.linear_merge(base, sources, coefficients, out), out))
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    together = threading.Barrier(2, timeout=30)

    def merge_case(base: torch.Tensor, sources: list[torch.Tensor]):
        out = torch.empty_like(base)
        together.wait()
        return fused_cpu.linear_merge(base, sources, coefficients, out), out

    for _ in range(3):  # a thread's first call also sets up torch on it: the later ones overlap in their loops
        results = fused_cpu.share([(n, lambda case=case: merge_case(*case)) for case in cases])
        for (result, out), (expected, expected_out) in zip(results, alone):
            assert same_bits(out, expected_out)
            assert result == expected


def test_an_error_on_the_calling_thread_returns_after_the_other_threads_are_done(monkeypatch):
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    done = []

    def fail():
        raise ValueError("a bad tensor")

    def slow():
        time.sleep(0.3)
        done.append(True)
        return 1

    unit = fused_cpu._MIN_SHARED_ENTRIES
    with pytest.raises(ValueError, match="a bad tensor"):
        fused_cpu.share([(unit, fail), (unit, slow)])  # the first share runs on the calling thread, the second on the pool
    assert done == [True]  # nothing writes after the error reaches the caller


def test_batches_split_evenly_between_threads_keep_the_bits_and_statistics_of_one_thread(monkeypatch, tmp_path):
    """A batch's tensors, end to end, are cut into one even span per thread: the merged bits are one
    thread's, a tensor merged whole by one thread has one thread's statistics bit for bit, and the
    tensor cut between the threads has them to the kernel's float32 block sums."""
    generator = torch.Generator().manual_seed(0)
    sizes = [900_001, 65_536, 700_003, 17, 500_000, 300_011]  # 2.47M entries: two threads, the cut inside the third
    base = {f"layer{i}.weight": torch.randn(n, generator=generator).to(torch.bfloat16) for i, n in enumerate(sizes)}
    models = [{n: (t.float() + 0.01 * torch.randn(t.shape, generator=generator)).to(t.dtype) for n, t in base.items()} for _ in range(3)]
    paths = [tmp_path / f"{i}.safetensors" for i in range(4)]
    for path, state in zip(paths, [base, *models]):
        save_file(state, str(path))
    pieces = []  # (thread, tensor's numel, start, stop) of every call of the C loop
    run = fused_cpu._LinearCall.run
    monkeypatch.setattr(
        fused_cpu._LinearCall, "run", lambda self, a, b: pieces.append((threading.get_ident(), self.n, a, b)) or run(self, a, b)
    )
    merged, reports, split = {}, {}, []
    for threads in (1, 2):
        monkeypatch.setattr(torch, "get_num_threads", lambda threads=threads: threads)
        pieces.clear()
        merged[threads] = merge(base, models, "task_arithmetic", scale=0.4)
        split.append(list(pieces))
        pieces.clear()
        out = tmp_path / f"{threads}.out.safetensors"
        reports[threads] = {t.name: t for t in merge_files(paths[0], paths[1:], out, "task_arithmetic", scale=0.4).tensors}
        split.append(list(pieces))
        assert all(same_bits(t, merged[threads][name]) for name, t in load_file(str(out)).items())
    for calls in split[2:]:  # merge's and merge_files' pieces on two threads
        entries: dict[int, int] = {}
        for thread, _, start, stop in calls:
            entries[thread] = entries.get(thread, 0) + stop - start
        assert len(entries) == 2
        assert abs(entries.popitem()[1] - entries.popitem()[1]) <= 16 * len(sizes)  # even, to the 16-entry steps
        assert sorted({n for _, n, _, _ in calls if sum(size == n for _, size, _, _ in calls) > 1}) == [700_003]  # one tensor cut
    aten = merge(base, models, "task_arithmetic", scale=0.4, fused=False)
    for name in base:
        assert same_bits(merged[2][name], merged[1][name]) and same_bits(merged[2][name], aten[name]), name
    for name, report in reports[2].items():
        if name != "layer2.weight":
            assert report == reports[1][name], name  # merged whole by one thread: the same sums, bit for bit
            continue
        one = reports[1][name]
        assert (report.density, report.sign_conflict) == (one.density, one.sign_conflict)  # exact counts
        # float32 sums within 16,384 entries (SUM_BLOCK), whose ends move with the cut, then float64
        torch.testing.assert_close(report.task_vector_norms, one.task_vector_norms, rtol=1e-6, atol=0)
        torch.testing.assert_close(report.merged_norm, one.merged_norm, rtol=1e-6, atol=0)


@pytest.mark.parametrize("threads", [1, 2, 3, 7])
def test_spans_cover_every_entry_once_in_even_aligned_spans(threads):
    lengths = [5, 1 << 20, 17, 300_001, 16, 1, 2_000_003]
    spans = fused_cpu._spans(lengths, threads)
    covered = [[] for _ in lengths]
    for span in spans:
        for index, start, stop in span:
            assert start % 16 == 0 and start < stop <= lengths[index]
            covered[index].append((start, stop))
    for n, pieces in zip(lengths, covered):
        pieces.sort()
        assert pieces[0][0] == 0 and pieces[-1][1] == n and all(a[1] == b[0] for a, b in zip(pieces, pieces[1:]))
    loads = [sum(stop - start for _, start, stop in span) for span in spans]
    assert len(spans) == threads and max(loads) - min(loads) <= 16 * len(lengths)


def test_supports_only_flat_inputs_of_one_kernel_dtype():
    base, sources = inputs(64, 2, torch.float32)
    out = torch.empty_like(base)
    assert fused_cpu.supports(base, sources, out)
    assert not fused_cpu.supports(base, [sources[0], sources[1].half()], out)  # mixed dtypes: ATen
    assert not fused_cpu.supports(base.double(), [s.double() for s in sources], out.double())  # float64: ATen
    assert not fused_cpu.supports(base[:32], [sources[0][:32], sources[1][::2]], out[:32])  # strided
    assert not fused_cpu.supports(base, sources, out[:63])  # output too short
    assert not fused_cpu.supports(base, [], out)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("method", "params"), [("task_arithmetic", {"scale": 0.3, "weights": [1.0, -0.5, 2.0]}), ("mean", {})])
def test_engine_merges_through_the_kernel_with_the_aten_paths_bits(monkeypatch, tmp_path, dtype, method, params):
    generator = torch.Generator().manual_seed(0)
    cast = lambda state: {n: t.to(dtype) if t.is_floating_point() else t for n, t in state.items()}  # noqa: E731
    base = tiny_vit(generator) | {"big.weight": torch.randn(300_001, generator=generator)}
    models = [cast(finetune(base, generator)) for _ in range(3)]
    base = cast(base)
    calls = []  # the numel of every tensor merged by the kernel
    start = fused_cpu._LinearCall.__init__
    monkeypatch.setattr(fused_cpu._LinearCall, "__init__", lambda self, base, *rest: calls.append(base.numel()) or start(self, base, *rest))
    fused = merge(base, models, method, **params)
    floating = [name for name, t in base.items() if t.is_floating_point()]
    assert sum(calls) == sum(base[name].numel() for name in floating)  # every float tensor went through the kernel
    aten = merge(base, models, method, fused=False, **params)
    assert len(calls) == len(floating)  # fused=False kept to ATen
    for name in floating:
        assert same_bits(fused[name], aten[name]), name

    paths = [tmp_path / f"{i}.safetensors" for i in range(4)]
    for path, state in zip(paths, [base, *models]):
        save_file(state, str(path))
    reports = [merge_files(paths[0], paths[1:], tmp_path / f"{f}.out.safetensors", method, fused=f, **params) for f in (True, False)]
    on_disk = [load_file(str(tmp_path / f"{f}.out.safetensors")) for f in (True, False)]
    for name in floating:
        assert same_bits(on_disk[0][name], fused[name]) and same_bits(on_disk[1][name], fused[name]), name
    for kernel, ops in zip(reports[0].tensors, reports[1].tensors):
        assert kernel.name == ops.name
        if not kernel.merged:
            continue
        theta0 = base[kernel.name].double().reshape(-1)
        truth = [(m[kernel.name].double().reshape(-1) - theta0).norm().item() for m in models]
        # the kernel's float32 sums within a chunk are closer to float64 than ATen's vector_norm
        # (bf16 "big.weight": 2e-8 against 4e-5 relative error)
        torch.testing.assert_close(kernel.task_vector_norms, truth, rtol=1e-6, atol=0)
        torch.testing.assert_close(ops.task_vector_norms, truth, rtol=1e-4, atol=0)
        torch.testing.assert_close(kernel.merged_norm, ops.merged_norm, rtol=1e-4, atol=1e-12)
        assert (kernel.density, kernel.sign_conflict) == (ops.density, ops.sign_conflict)  # exact count, same sample


def test_without_a_compiler_merges_use_aten_and_say_so(monkeypatch, caplog):
    monkeypatch.setattr(fused_cpu, "_compiler", lambda: None)
    fused_cpu._library.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="clpeft.merging.fused_cpu"):
            assert not fused_cpu.available()
        assert "no C compiler found (set CC)" in caplog.text
        base, sources = inputs(1000, 2, torch.bfloat16)
        state = merge({"w": base}, [{"w": s} for s in sources], "task_arithmetic", scale=0.5)
        assert same_bits(state["w"], reference(base, sources, [0.5, 0.5])[0])
    finally:
        fused_cpu._library.cache_clear()


def test_the_switch_turns_the_kernel_off(monkeypatch):
    monkeypatch.setenv("CLPEFT_CPU_KERNEL", "0")
    assert not fused_cpu.available()
    base, sources = inputs(64, 2, torch.float32)
    assert not fused_cpu.supports(base, sources, torch.empty_like(base))


def test_a_failing_compiler_is_reported_and_the_library_is_built_once(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("CLPEFT_CACHE", str(tmp_path / "cache"))
    broken = tmp_path / "broken-cc"
    broken.write_text("#!/bin/sh\n[ \"$1\" = --version ] && echo broken 1.0 && exit 0\necho 'error: no backend' >&2\nexit 1\n")
    broken.chmod(0o755)
    monkeypatch.setenv("CC", str(broken))
    fused_cpu._library.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="clpeft.merging.fused_cpu"):
            assert not fused_cpu.available()
        assert "did not compile (error: no backend)" in caplog.text
        assert not (tmp_path / "cache" / "kernels").exists() or not list((tmp_path / "cache" / "kernels").glob("*.so"))

        monkeypatch.delenv("CC")
        fused_cpu._library.cache_clear()
        assert fused_cpu.available()
        built = list((tmp_path / "cache" / "kernels").glob("linear_merge-*.so"))
        assert len(built) == 1
        stamp = built[0].stat().st_mtime_ns
        compiles = []
        run = fused_cpu.subprocess.run
        monkeypatch.setattr(fused_cpu.subprocess, "run", lambda args, **kw: compiles.append(args) or run(args, **kw))
        fused_cpu._library.cache_clear()
        assert fused_cpu.available()
        assert all("--version" in args for args in compiles)  # found in the cache: nothing compiled
        assert built[0].stat().st_mtime_ns == stamp
    finally:
        fused_cpu._library.cache_clear()


def test_a_library_others_could_have_written_is_not_loaded(monkeypatch, tmp_path, caplog):
    """A shared cache folder must not let another user plant code that a merge would run."""
    monkeypatch.setenv("CLPEFT_CACHE", str(tmp_path / "cache"))
    fused_cpu._library.cache_clear()
    try:
        assert fused_cpu.available()
        (built,) = (tmp_path / "cache" / "kernels").glob("linear_merge-*.so")
        for target, mode in ((built, 0o777), (built.parent, 0o777)):
            original = target.stat().st_mode
            target.chmod(mode)
            fused_cpu._library.cache_clear()
            caplog.clear()
            with caplog.at_level(logging.WARNING, logger="clpeft.merging.fused_cpu"):
                assert not fused_cpu.available()
            assert f"not loading {built}" in caplog.text and "writable by other users" in caplog.text
            target.chmod(original)
        fused_cpu._library.cache_clear()
        assert fused_cpu.available()
    finally:
        fused_cpu._library.cache_clear()


def test_kth_largest_magnitude_is_kthvalues_exactly():
    """Radix selection over the magnitudes' bits: ties, both zeros, subnormals and huge values,
    k at both ends; the value ``abs().kthvalue`` gives, bit for bit."""
    generator = torch.Generator().manual_seed(3)
    values = torch.randn(200_003, generator=generator) * torch.logspace(-40, 30, 200_003)
    values[::7] = 0.0
    values[1::7] = -0.0
    values[2::11] = values[3::11]  # repeated magnitudes
    values[5::13] = -values[5::13]
    n = values.numel()
    for k in [1, 2, 17, n // 5, n // 2, n - 1, n]:
        expected = values.abs().kthvalue(n - k + 1).values
        assert same_bits(fused_cpu.kth_largest_magnitude(values, k), expected), k
    with pytest.raises(ValueError, match="k must lie in"):
        fused_cpu.kth_largest_magnitude(values, 0)


@pytest.mark.parametrize("n", [600_001, 2_000_003])
def test_kth_largest_magnitude_of_a_large_tensor_is_exact_whether_or_not_the_bracket_holds(n):
    """Tensors of 2^19 entries and more are bracketed from a strided sample first; the value is
    ``abs().kthvalue``'s whether the answer lies in the bracket (random values), at one of its ends
    (many equal magnitudes: a bf16 task vector), outside it (a sample that sees only planted
    outliers) or in a band too large to keep (one repeated value)."""
    generator = torch.Generator().manual_seed(n)
    values = torch.randn(n, generator=generator) * torch.logspace(-3, 3, n)[torch.randperm(n, generator=generator)]
    values[::7] = 0.0
    values[2::11] = -values[3::11]
    m = max(16_384, n // 512)  # the kernel's sample: m entries in runs of 16, one run every `stride`
    stride = n // (m // 16) // 16 * 16
    planted = values.clone()
    planted[(torch.arange(m) // 16) * stride + torch.arange(m) % 16] = 1e6
    repeated = torch.full((n,), -0.25)
    repeated[::3] = 0.5
    halves = values.bfloat16().float() - values.mul(1.01).bfloat16().float()  # a bf16 task vector: many ties
    for case in (values, planted, repeated, halves):
        # n // 3 + 100: just below the third of entries tied at 0.5 (repeated); m + 100: just below
        # the planted outliers, which alone make the bracket's upper and lower ends
        for k in [1, 1_000, n // 5, n // 3 + 100, n // 2, (9 * n) // 10, m + 100, n]:
            expected = case.abs().kthvalue(n - k + 1).values
            assert same_bits(fused_cpu.kth_largest_magnitude(case, k), expected), k


def test_ties_trims_through_the_selection_kernel_for_float32_only(monkeypatch):
    from clpeft.merging.methods import sparsify

    calls = []
    select = fused_cpu.kth_largest_magnitude
    monkeypatch.setattr(fused_cpu, "kth_largest_magnitude", lambda v, k: calls.append(v.dtype) or select(v, k))
    values = torch.randn(50_000, generator=torch.Generator().manual_seed(4))
    assert torch.equal(sparsify.kth_largest_magnitude(values, 9_000), values.abs().kthvalue(50_000 - 9_000 + 1).values)
    assert torch.equal(sparsify.kth_largest_magnitude(values.double(), 9_000), values.double().abs().kthvalue(41_001).values)
    assert calls == [torch.float32]  # float64 keeps the bracketed selection


def election_rows(k: int, n: int, seed: int) -> torch.Tensor:
    """``(k, n)`` sparse task vectors over six decades with exact zeros, negative zeros, rows that
    cancel another exactly, repeated magnitudes (trim ties) and sums that cancel to a last bit."""
    generator = torch.Generator().manual_seed(seed)
    rows = torch.randn(k, n, generator=generator) * torch.logspace(-4, 2, n)[torch.randperm(n, generator=generator)]
    rows[:, ::5] = 0.0
    rows[0, 1::9] = -0.0
    rows[:, 2::11] = rows[:, 3::11]
    if k > 2:
        rows[2] = -rows[1]
    if k > 3:
        rows[3, ::3] = -(rows[0, ::3] + rows[1, ::3])  # totals of about one rounding error, either sign
    return rows


@pytest.mark.parametrize("disjoint", ["mean", "sum"])
@pytest.mark.parametrize("k", [1, 3, 4, 11])
@pytest.mark.parametrize("fused_trim", [False, True], ids=["rows_trimmed_before", "trim_fused"])
def test_ties_election_equals_the_aten_election_bit_for_bit(monkeypatch, disjoint, k, fused_trim):
    """``ties_elect`` (with TIES' trim fused in, or on rows already trimmed) against ATen's
    ``generalized._elect`` after ``trim_below_``: 3 chunks of 2,048 and a tail of 13, and 700,000
    columns split over two threads; coefficients negative, zero and not representable in binary."""
    from clpeft.merging.methods.generalized import _elect
    from clpeft.merging.methods.sparsify import shrink_lambdas, trim_below_

    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    coefficients = torch.tensor([0.3, -0.7, 1.0, 0.0, 2.5, 0.1, -1.1, 0.6, 1.7, 0.01, 3.0][:k])
    for n in (3 * 2048 + 13, 700_000):
        rows = election_rows(k, n, seed=k)
        thresholds = rows.abs().kthvalue(n - n // 4 + 1, dim=1).values  # keep the top quarter and ties
        thresholds[0] = 0.0  # row 0 kept whole, zeros dropped
        trimmed = trim_below_(rows.clone(), thresholds)
        expected = _elect(trimmed.clone(), coefficients, disjoint)
        given = rows.clone() if fused_trim else trimmed.clone()
        lambdas = shrink_lambdas(thresholds, torch.float32) if fused_trim else None
        merged = fused_cpu.ties_elect(given, coefficients.tolist(), disjoint == "mean", lambdas)
        assert merged.data_ptr() == given.data_ptr()  # written into row 0
        assert same_bits(merged, expected), n
        assert torch.equal(given[1:], (rows if fused_trim else trimmed)[1:])  # other rows untouched
        assert expected.abs().max() > 0 and (expected == 0).any()


@pytest.mark.parametrize("dtype", DTYPES)
def test_ties_merges_through_the_election_kernel_with_the_aten_bits(monkeypatch, dtype):
    """A whole TIES merge (the model's or each tensor's trim fused into the election; the model's
    sweeps counted from the inputs; bf16 / fp16 task vectors formed by the subtraction kernel) gives the bits of the same merge with
    ``CLPEFT_CPU_KERNEL=0``, and uses the election kernel once per tensor; ``trim: topk`` trims
    with ATen first (exactly k entries), then elects in the kernel."""
    generator = torch.Generator().manual_seed(5)
    cast = lambda state: {n: t.to(dtype) if t.is_floating_point() else t for n, t in state.items()}  # noqa: E731
    base = tiny_vit(generator) | {"big.weight": torch.randn(300_001, generator=generator)}
    models = [cast(finetune(base, generator)) for _ in range(3)]
    base = cast(base)
    calls, sweeps = [], []
    elect, count = fused_cpu.ties_elect, fused_cpu.count_difference_digits
    monkeypatch.setattr(fused_cpu, "ties_elect", lambda *a: calls.append(len(a) > 3) or elect(*a))
    monkeypatch.setattr(fused_cpu, "count_difference_digits", lambda *a: sweeps.append(a[2]) or count(*a))
    floating = [name for name, t in base.items() if t.is_floating_point()]
    for scope in ("model", "tensor"):
        calls.clear()
        sweeps.clear()
        params = {"density": 0.3, "weights": [1.0, -0.5, 2.0], "trim_scope": scope}
        fused = merge(base, models, "ties", **params)
        assert calls == [True] * len(floating)  # trims fused in: the whole model's cut-offs, or each tensor's
        # the model's two radix sweeps count straight from the inputs, one call per tensor each
        assert sweeps == ([16] * len(floating) + [0] * len(floating) if scope == "model" else [])
        monkeypatch.setenv("CLPEFT_CPU_KERNEL", "0")
        aten = merge(base, models, "ties", **params)
        monkeypatch.delenv("CLPEFT_CPU_KERNEL")
        assert len(calls) == len(floating)
        for name in floating:
            assert same_bits(fused[name], aten[name]), (scope, name)
    calls.clear()
    params = {"density": 0.3, "trim_scope": "tensor", "trim": "topk"}
    fused = merge(base, models, "ties", **params)
    assert calls == [False] * len(floating)
    monkeypatch.setenv("CLPEFT_CPU_KERNEL", "0")
    aten = merge(base, models, "ties", **params)
    assert all(same_bits(fused[name], aten[name]) for name in floating)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_ties_whole_model_trim_of_a_large_model_bracketed_from_the_inputs_keeps_the_aten_bits(monkeypatch, dtype):
    """A model of 2^19 entries or more: the whole-model trim's cut-offs from a sample sweep and a band
    sweep straight from the inputs (one band call per tensor, no radix sweep), and the merge's bits those
    of ``CLPEFT_CPU_KERNEL=0`` (ATen's radix sweeps)."""
    generator = torch.Generator().manual_seed(8)
    cast = lambda state: {n: t.to(dtype) if t.is_floating_point() else t for n, t in state.items()}  # noqa: E731
    base = tiny_vit(generator) | {"big.weight": torch.randn(700, 1000, generator=generator)}
    models = [cast(finetune(base, generator)) for _ in range(3)]
    base = cast(base)
    bands, sweeps = [], []
    band, count = fused_cpu.band_magnitudes, fused_cpu.count_difference_digits
    monkeypatch.setattr(
        fused_cpu, "band_magnitudes", lambda *a, base=None: bands.append(None if base is None else base.numel()) or band(*a, base=base)
    )
    monkeypatch.setattr(fused_cpu, "count_difference_digits", lambda *a: sweeps.append(a[2]) or count(*a))
    fused = merge(base, models, "ties", density=0.2)
    floating = [name for name, t in base.items() if t.is_floating_point()]
    assert sorted(bands) == sorted(base[name].numel() for name in floating) and sweeps == []
    monkeypatch.setenv("CLPEFT_CPU_KERNEL", "0")
    aten = merge(base, models, "ties", density=0.2)
    for name in floating:
        assert same_bits(fused[name], aten[name]), name


@pytest.mark.parametrize("dtype", DTYPES)
def test_ties_reports_the_same_statistics_through_the_kernels(monkeypatch, tmp_path, dtype):
    """The report of a TIES merge whose task vectors, trim, election and output all ran in the compiled
    loops (norms summed on the way) against ``CLPEFT_CPU_KERNEL=0``'s ATen statistics: the same
    density (an exact count) and sign conflict, the norms within float32 summation error."""
    generator = torch.Generator().manual_seed(6)
    cast = lambda state: {n: t.to(dtype) if t.is_floating_point() else t for n, t in state.items()}  # noqa: E731
    base = tiny_vit(generator) | {"big.weight": torch.randn(300_001, generator=generator)}
    paths = [tmp_path / f"{i}.safetensors" for i in range(4)]
    for path, state in zip(paths, [base, *[finetune(base, generator) for _ in range(3)]]):
        save_file(cast(state), str(path))
    kernel = merge_files(paths[0], paths[1:], tmp_path / "kernel.safetensors", "ties", density=0.3)
    monkeypatch.setenv("CLPEFT_CPU_KERNEL", "0")
    aten = merge_files(paths[0], paths[1:], tmp_path / "aten.safetensors", "ties", density=0.3)
    merged = [t for t in kernel.tensors if t.merged]
    assert len(merged) > 10 and any(t.density < 1 for t in merged)
    for fast, ops in zip(kernel.tensors, aten.tensors):
        assert (fast.name, fast.sign_conflict) == (ops.name, ops.sign_conflict)
        if fast.merged:  # the same count (ATen's density is a float32 ratio, the kernel's float64)
            numel = math.prod(fast.shape)
            assert round(fast.density * numel) == round(ops.density * numel)
            torch.testing.assert_close(fast.task_vector_norms, ops.task_vector_norms, rtol=1e-4, atol=1e-12)
            torch.testing.assert_close(fast.merged_norm, ops.merged_norm, rtol=1e-4, atol=1e-12)


@pytest.mark.parametrize("dtype", DTYPES)
def test_subtraction_kernel_forms_task_vectors_with_atens_bits(monkeypatch, dtype):
    """``subtract``: ``source.float() - base`` (16-entry steps and a tail of 7; 2,500,007 entries split
    over two threads), including subnormals, infinities and exact zeros, bit for bit; its sum of
    squares is the float64 one to float32-within-a-chunk accuracy."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    for n in (16 * 5 + 7, 2_500_007):
        base_half, sources = inputs(n, 2, dtype, seed=n)
        source, base = sources[1], base_half.float()
        assert fused_cpu.supports_subtraction(source, base, torch.empty_like(base))
        out = torch.empty_like(base)
        squares = fused_cpu.subtract(source, base, out)
        assert same_bits(out, source.float() - base), n
        assert squares == pytest.approx((source.double() - base.double()).square().sum().item(), rel=1e-6)
        source[:4] = torch.tensor([float("inf"), -float("inf"), 1e-7, -0.0], dtype=dtype)
        assert fused_cpu.subtract(source, base, out) == float("inf")
        assert same_bits(out, source.float() - base), n
    assert not fused_cpu.supports_subtraction(base.double(), base, out)  # float64: ATen


@pytest.mark.parametrize("dtype", DTYPES)
def test_finish_kernel_rounds_the_merged_tensor_as_aten_and_sums_the_report(monkeypatch, dtype):
    """``finish``: ``(base + delta).to(dtype)`` bit for bit (ties to even, overflow, NaN) over chunks,
    tails and two threads; the report's sums of squares near float64's and the non-zero count exact
    (NaN counts, -0.0 does not: ``torch.count_nonzero``'s convention)."""
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    step = HALF_STEP.get(dtype, 2.0**-24)
    for n in (16 * 5 + 7, 2_500_007):
        generator = torch.Generator().manual_seed(n)
        base = torch.randn(n, generator=generator) * torch.logspace(-4, 2, n)
        delta = torch.randn(n, generator=generator) * 1e-2
        delta[::3] = 0.0
        delta[1::7] = -0.0
        base[:6] = torch.tensor([1.0, 1.0, 3e38, 0.0, 1.0, 2.0])
        delta[:6] = torch.tensor([step, -step / 2, 3e38, float("nan"), 3 * step, -0.0])
        out = torch.empty(n, dtype=dtype)
        assert fused_cpu.supports_finish(base, delta, out)
        sums = fused_cpu.finish(base, delta, out)
        expected = (base + delta).to(dtype)
        assert out[3].isnan() and expected[3].isnan()
        out[3], expected[3] = 0, 0  # NaN payloads: any quiet NaN
        assert same_bits(out, expected), n
        assert sums[2] == torch.count_nonzero(delta)
        assert sums[0].isinf() and sums[1].isnan()  # 3e38 squared overflows float32; the NaN's square
        base[2] = delta[2] = delta[3] = 0.0
        sums = fused_cpu.finish(base, delta, out)
        assert sums[0] == pytest.approx(base.double().square().sum().item(), rel=1e-6)
        assert sums[1] == pytest.approx(delta.double().square().sum().item(), rel=1e-6)
    assert not fused_cpu.supports_finish(base.double(), delta.double(), out)  # float64: ATen
    assert not fused_cpu.supports_finish(base, delta[:-1], out[:-1])  # lengths differ


def test_empty_tensors_pass_through_every_loop():
    """Zero-size tensors (a model may hold one): no work, no thread range, no error."""
    empty = torch.zeros(0)
    assert fused_cpu.ties_elect(torch.zeros(2, 0), [1.0, 1.0], True).numel() == 0
    assert fused_cpu.subtract(torch.zeros(0, dtype=torch.bfloat16), empty, empty.clone()) == 0.0
    assert fused_cpu.finish(empty, empty, torch.zeros(0, dtype=torch.bfloat16)).tolist() == [0.0, 0.0, 0.0]
    counts = torch.zeros(2, 1 << 16, dtype=torch.int64)
    fused_cpu.count_magnitude_digits(torch.zeros(2, 0), 16, [0, 0], counts)
    assert counts.sum() == 0


@pytest.mark.parametrize("dtype", DTYPES)
def test_sweeps_from_the_inputs_count_what_the_formed_task_vectors_count(monkeypatch, dtype):
    """``count_difference_digits`` (task vectors formed a chunk at a time in a cached row) against
    ``count_magnitude_digits`` of ``subtract_rows``' task vectors, both sweeps: chunks of 2,048 and a
    tail of 5, 3 x 400,005 entries over two threads, exact zeros and cancellations included."""
    from clpeft.merging.blocks import subtract_rows

    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    for n in (2 * 2048 + 5, 400_005):
        base_half, sources = inputs(n, 3, dtype, seed=7)
        base = base_half.float()
        task_vectors = torch.empty(3, n)
        subtract_rows(task_vectors, sources, base)
        for shift, prefixes in ((16, [0, 0, 0]), (0, [int(v) for v in (task_vectors.abs()[:, 77].view(torch.int32) >> 16)])):
            expected, counts = (torch.zeros(3, 1 << 16, dtype=torch.int64) for _ in range(2))
            fused_cpu.count_magnitude_digits(task_vectors, shift, prefixes, expected)
            fused_cpu.count_difference_digits(sources, base, shift, prefixes, counts)
            assert torch.equal(counts, expected) and expected.sum() > 0, (n, shift)


@pytest.mark.parametrize("dtype", DTYPES)
def test_sign_conflict_counts_report_sign_conflicts_sample_exactly(dtype):
    """``fused_cpu.sign_conflict`` (one compiled loop over the sample) and ``linear_merge``'s count (the
    sampled runs of each chunk as it is merged; 1,000,000 entries span many chunks) against ATen's
    ``report.sign_conflict`` of ``sample_entries``' sampled task vectors: the same float32 value for every
    sample layout (the whole tensor up to 32768 / K entries; runs of 64 with a step, a partial last run
    left out, a step of 1), exact zeros, and NaN / inf differences (a column holding a NaN is no
    conflict: ATen's amax / amin propagate it)."""
    from clpeft.merging.report import sample_entries, sign_conflict

    for n in (1, 63, 8192, 8193, 16_447, 100_003, 1_000_000):
        for k in (1, 2, 4, 7):
            base, sources = inputs(n, k, dtype, seed=n + k)
            if n > 100:
                sources[-1][3] = math.nan
                sources[0][9] = -math.inf
                base[11] = math.inf  # inf - inf: NaN for every model
            if k >= 3:  # the last entry (of a whole-tensor sample's tail past the last 16) a conflict but for a NaN
                sources[0][-1], sources[1][-1], sources[2][-1] = base[-1] + 1, base[-1] - 1, math.nan
            sample = torch.stack([sample_entries(s, k).float() for s in sources]) - sample_entries(base, k).float()
            expected = sign_conflict(sample)
            assert torch.equal(fused_cpu.sign_conflict(base, sources), expected), (n, k)
            _, counted_while_merging = fused_cpu.linear_merge(base, sources, [0.5] * k, torch.empty_like(base))
            assert counted_while_merging == expected.item(), (n, k)
            assert expected.dtype == torch.float32 and (k == 1 or n < 64 or 0 < expected < 1)


def test_linear_merge_reports_the_aten_sign_conflict(monkeypatch, tmp_path):
    """A task-arithmetic merge reports, through the compiled loops, the sign conflict of
    ``CLPEFT_CPU_KERNEL=0`` (ATen's sample and arithmetic), for large and small tensors of each dtype."""
    generator = torch.Generator().manual_seed(3)
    base = tiny_vit(generator) | {"big.weight": torch.randn(300_001, generator=generator)}
    states = [base, *[finetune(base, generator) for _ in range(3)]]
    for dtype in DTYPES:
        paths = [tmp_path / f"{dtype}_{i}.safetensors" for i in range(4)]
        for path, state in zip(paths, states):
            save_file({n: t.to(dtype) if t.is_floating_point() else t for n, t in state.items()}, str(path))
        reports = []
        for kernel in ("1", "0"):
            monkeypatch.setenv("CLPEFT_CPU_KERNEL", kernel)
            reports.append(merge_files(paths[0], paths[1:], tmp_path / f"{dtype}_{kernel}.out", "task_arithmetic", scale=0.4))
        conflicts = [[(t.name, t.sign_conflict) for t in report.tensors if t.merged] for report in reports]
        assert len(conflicts[0]) > 10 and conflicts[0] == conflicts[1], dtype
        assert any(c > 0 for _, c in conflicts[0])


def test_pack_sums_on_the_host_gives_the_tensor_formulas_values():
    """``report.pack_sums`` of host sums and ``pack_host_sums`` (Python floats, no ATen call each): a hand-worked example, and
    the values of the formulas in ATen float64 ops on awkward sums."""
    from clpeft.merging.report import pack_host_sums, pack_sums

    packed = pack_sums(torch.tensor([4.0, 9.0, 3.0, 16.0, 25.0], dtype=torch.float64), torch.tensor(0.25), 6)
    assert packed.dtype == torch.float64 and packed.tolist() == [2.0, 0.25, 3.0, 0.5, 4.0, 5.0]
    assert pack_host_sums([4.0, 9.0, 3.0, 16.0, 25.0], 0.25, 6) == [2.0, 0.25, 3.0, 0.5, 4.0, 5.0]  # the CPU kernel's floats
    sums = torch.rand(9, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 1e7 + 1e-3
    conflict = torch.tensor(1 / 3, dtype=torch.float32)
    expected = torch.cat([torch.stack([sums[0].sqrt(), conflict.double(), sums[1].sqrt(), sums[2] / 123_457]), sums[3:].sqrt()])
    assert torch.equal(pack_sums(sums, conflict, 123_457), expected)
    assert pack_host_sums(sums.tolist(), conflict.item(), 123_457) == expected.tolist()


def test_sign_conflicts_refuses_a_dtype_the_build_lacks():
    """The C entry point answers -1 for a dtype code it was not built with (no count from garbage);
    ``fused_cpu.sign_conflict`` would raise on it."""
    import ctypes

    base, sources = inputs(64, 2, torch.float32)
    pointers = (ctypes.c_void_p * 2)(*[s.data_ptr() for s in sources])
    assert fused_cpu._library().clpeft_sign_conflicts(7, 64, 2, base.data_ptr(), pointers, 64, 0, 1) == -1
    assert fused_cpu._library().clpeft_sign_conflicts(0, 64, 2, base.data_ptr(), pointers, 64, 0, 1) >= 0
