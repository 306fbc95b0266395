"""TIES' trim over the whole model: the streamed radix selection and the two-pass merge.

Mutations checked once: the chosen digit off by one in ``KthLargestMagnitude.end_sweep`` (20 tests
fail); the cut-off rounded to nearest instead of up for float32 rows in ``trim_below_`` (the last
test fails). Counting entries below the prefix as digit 0 (``clamp_(0, ...)``) is an equivalent
mutant: digit 0 is examined last, so its count never changes which digit reaches the rank.
"""

from __future__ import annotations

import pytest
import torch

from clpeft.errors import UserError
from clpeft.merging import LoraAdapter, fused_cpu, merge
from clpeft.merging.methods.model_trim import KthLargestMagnitude
from clpeft.merging.registry import ModelShape


def select(blocks: list[torch.Tensor], k: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Run the statistic over ``blocks`` (each ``(K, n_l)``) as the engine does; copies are fed."""
    shape = ModelShape(sum(b.shape[1] for b in blocks), blocks[0].shape[0], dtype, torch.device("cpu"))
    statistic = KthLargestMagnitude(k, shape)
    while statistic.wants_sweep():
        for block in blocks:
            statistic.observe(block.clone())
        statistic.end_sweep()
    return statistic.result()


def kth_largest_by_sorting(blocks: list[torch.Tensor], k: int) -> torch.Tensor:
    flat = torch.cat(blocks, dim=1).abs().to(torch.float64)
    return flat.sort(dim=1, descending=True).values[:, k - 1]


BLOCKS = {
    "gaussian": lambda g: [torch.randn(3, n, generator=g) * s for n, s in [(700, 1e-3), (50, 1.0), (3000, 1e-2)]],
    "ties and zeros": lambda g: [torch.randint(-4, 5, (3, n), generator=g).float() / 8 for n in (500, 64, 1200)],
    "float64": lambda g: [torch.randn(2, n, generator=g, dtype=torch.float64) for n in (900, 33)],
    "tiny and huge": lambda g: [torch.tensor([[1e-30, -3e30, 0.0, 2e-38, 7.0], [5e-45, 1e38, -1e-20, 1.0, 0.0]])],
}


@pytest.mark.parametrize("make", BLOCKS.values(), ids=BLOCKS.keys())
@pytest.mark.parametrize("fraction", [0.0001, 0.2, 0.5, 0.97])
def test_kth_largest_magnitude_is_exact(make, fraction):
    blocks = make(torch.Generator().manual_seed(0))
    n = sum(b.shape[1] for b in blocks)
    k = max(1, int(fraction * n))
    found = select(blocks, k, blocks[0].dtype)
    assert found.dtype == blocks[0].dtype
    assert torch.equal(found.double(), kth_largest_by_sorting(blocks, k))


@pytest.mark.parametrize("kernel", ["1", "0"], ids=["compiled", "aten"])
def test_float32_sweeps_count_in_the_compiled_loop_or_aten_with_the_same_result(monkeypatch, kernel):
    """Float32 rows on the CPU are counted by ``fused_cpu.count_magnitude_digits`` (rows over the
    torch threads: 3 x 700,001 entries, a tail of 1), or by ATen with ``CLPEFT_CPU_KERNEL=0``; the
    same exact cut-off either way, the input rows untouched by the compiled loop."""
    if kernel == "1" and not fused_cpu.available():
        pytest.skip("no C compiler: the kernel is not built")
    monkeypatch.setenv("CLPEFT_CPU_KERNEL", kernel)
    calls = []
    count = fused_cpu.count_magnitude_digits
    monkeypatch.setattr(fused_cpu, "count_magnitude_digits", lambda *a: calls.append(a[1]) or count(*a))
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    g = torch.Generator().manual_seed(1)
    blocks = [torch.randn(3, 700_001, generator=g) * torch.tensor([[1e-3], [1.0], [1e5]]), torch.randn(3, 9, generator=g)]
    blocks[0][:, ::7] = 0.0
    kept = [b.clone() for b in blocks]
    shape = ModelShape(sum(b.shape[1] for b in blocks), 3, torch.float32, torch.device("cpu"))
    for k in (1, 123_457, 700_009):  # the last one among the zeros
        statistic = KthLargestMagnitude(k, shape)
        while statistic.wants_sweep():
            for block in blocks:
                statistic.observe(block if kernel == "1" else block.clone())
            statistic.end_sweep()
        assert torch.equal(statistic.result().double(), kth_largest_by_sorting(blocks, k)), k
    assert calls == []  # compiled: the bracket settled each k without radix sweeps (ATen: bincount)
    assert all(torch.equal(b, c) for b, c in zip(blocks, kept))


def sampled_positions(n: int) -> torch.Tensor:
    """The whole-model bracket's sample (model_bracket.py): runs of 16 entries, one every stride."""
    runs = min(max(n // 512, 1 << 14), 1 << 20) // 16
    return ((torch.arange(runs) * (n // runs))[:, None] + torch.arange(16)).reshape(-1)


def bracket_cases(g: torch.Generator) -> dict[str, list[torch.Tensor]]:
    gaussian = [torch.randn(3, 400_003, generator=g) * torch.tensor([[1e-3], [1.0], [1e5]]), torch.randn(3, 9, generator=g)]
    gaussian.append(torch.randn(3, 300_000, generator=g) * 1e-2)
    gaussian[0][:, ::7] = 0.0
    halves = [b.bfloat16().float() - (b * 1.01).bfloat16().float() for b in gaussian]  # bf16 task vectors: many ties
    flat = torch.cat(gaussian, dim=1)
    flat[:, sampled_positions(flat.shape[1])] = 1e6  # the sample sees only these: the bracket misses
    planted = list(flat.split([b.shape[1] for b in gaussian], dim=1))
    repeated = [torch.full((3, b.shape[1]), -0.25) for b in gaussian]
    for block in repeated:
        block[:, ::3] = 0.5
    return {"gaussian": gaussian, "bf16 ties": halves, "planted": planted, "repeated": repeated}


@pytest.mark.parametrize("inputs", ["task vectors", "differences"])
def test_the_bracket_settles_large_float32_models_in_two_sweeps_or_falls_back_to_the_radix_sweeps(monkeypatch, inputs):
    """On the CPU in float32 a model of 2^19 entries or more is bracketed from a sample: the exact
    thresholds after a sample sweep and a band sweep (the answer inside the bracket or at one of its
    ends: many equal bf16 magnitudes, two repeated values), or after the two radix sweeps as well when the sample misled
    (planted outliers at the sampled positions), from formed task vectors or from the inputs."""
    if not fused_cpu.available():
        pytest.skip("no C compiler: the kernel is not built")
    monkeypatch.setattr(torch, "get_num_threads", lambda: 2)
    for name, blocks in bracket_cases(torch.Generator().manual_seed(2)).items():
        n = sum(b.shape[1] for b in blocks)
        shape = ModelShape(n, 3, torch.float32, torch.device("cpu"))
        halves_at = sum(-(-b.shape[1] // 3) for b in blocks)  # "repeated": the last of the 0.5s, the bracket's upper end
        for k in (1, 1_000, 20_000, n // 5, halves_at, n // 2, n - 1):
            statistic, sweeps = KthLargestMagnitude(k, shape), 0
            while statistic.wants_sweep():
                for block in blocks:
                    if inputs == "differences":  # theta_t = tau_t exactly when theta_0 = 0
                        assert statistic.observe_differences(list(block), torch.zeros(block.shape[1]))
                    else:
                        statistic.observe(block.clone())
                statistic.end_sweep()
                sweeps += 1
            assert torch.equal(statistic.result().double(), kth_largest_by_sorting(blocks, k)), (name, k)
            # planted: the outliers answer the first ranks (the sample's size); below them the bracket, the
            # outliers' value at both ends, has missed, until the lower end drops to 0 (k = n - 1: a band
            # of the whole model, which fits)
            missed = name == "planted" and sampled_positions(n).numel() < k <= n // 2
            assert sweeps == (4 if missed else 2), (name, k)


def test_rows_the_bracket_cannot_read_drop_it_and_the_radix_sweeps_count_everything():
    """A tensor of float64 rows in the sample sweep: that sweep counts nothing, then the radix sweeps."""
    g = torch.Generator().manual_seed(3)
    blocks = [torch.randn(2, 600_000, generator=g), torch.randn(2, 50, generator=g)]
    shape = ModelShape(600_050, 2, torch.float32, torch.device("cpu"))
    statistic, sweeps = KthLargestMagnitude(120_000, shape), 0
    while statistic.wants_sweep():
        statistic.observe(blocks[0].clone())
        statistic.observe(blocks[1].double() if sweeps == 0 else blocks[1].clone())
        statistic.end_sweep()
        sweeps += 1
    assert sweeps == 3 and torch.equal(statistic.result().double(), kth_largest_by_sorting(blocks, 120_000))


def test_float32_takes_two_sweeps_float64_four_and_extremes_none():
    def sweeps(k: int, dtype: torch.dtype) -> int:
        statistic = KthLargestMagnitude(k, ModelShape(10, 1, dtype, torch.device("cpu")))
        count = 0
        while statistic.wants_sweep():
            statistic.observe(torch.arange(10, dtype=dtype)[None])
            statistic.end_sweep()
            count += 1
        return count

    assert (sweeps(3, torch.float32), sweeps(3, torch.float64)) == (2, 4)
    assert sweeps(0, torch.float32) == sweeps(10, torch.float32) == 0
    assert (
        KthLargestMagnitude(0, ModelShape(10, 2, torch.float32, torch.device("cpu"))).result().tolist() == [float("inf")] * 2
    )  # keep nothing
    assert KthLargestMagnitude(10, ModelShape(10, 2, torch.float32, torch.device("cpu"))).result().tolist() == [0.0] * 2


def flattened_ties(base: dict, finetuned: list[dict], names: list[str], density: float, scale: float) -> dict:
    """TIES by hand on the concatenated task vectors of ``names`` (Yadav et al., Algorithm 1)."""
    flat = torch.stack([torch.cat([(m[n] - base[n]).double().reshape(-1) for n in names]) for m in finetuned])
    k = int(density * flat.shape[1])
    threshold = flat.abs().sort(dim=1, descending=True).values[:, k - 1 : k]
    trimmed = flat * (flat.abs() >= threshold)
    sign = torch.where(trimmed.sum(0) >= 0, 1.0, -1.0)
    agree = trimmed * (torch.sign(trimmed) == sign)
    merged = scale * agree.sum(0) / (agree != 0).sum(0).clamp(min=1)
    out, start = {}, 0
    for n in names:
        out[n] = base[n].double() + merged[start : start + base[n].numel()].view(base[n].shape)
        start += base[n].numel()
    return out


def test_model_scope_trims_the_flattened_model_and_differs_from_tensor_scope(models):
    """The default: one cut-off per task over every merged tensor (not per tensor)."""
    base, finetuned = models
    for m, gain in zip(finetuned, (1.0, 3.0, 0.3)):  # tensors of different magnitude: the scopes then disagree
        name = "blocks.0.mlp.fc1.weight"
        m[name] = base[name] + gain * (m[name] - base[name])
    merged = merge(base, finetuned, "ties", density=0.2, scale=0.7)
    names = [n for n, t in base.items() if t.is_floating_point()]
    expected = flattened_ties(base, finetuned, names, 0.2, 0.7)
    for name in names:
        torch.testing.assert_close(merged[name].double(), expected[name], rtol=0, atol=1e-6)
    per_tensor = merge(base, finetuned, "ties", density=0.2, scale=0.7, trim_scope="tensor")
    assert not torch.equal(per_tensor["blocks.0.mlp.fc1.weight"], merged["blocks.0.mlp.fc1.weight"])


def test_model_scope_counts_only_merged_tensors(models):
    """Skipped and base-kept tensors are no task vectors: the cut-off is over the merged ones only."""
    base, finetuned = models
    rules = {"skip": ["head.*"], "keep_base": ["pos_embed", "cls_token"]}
    merged = merge(base, finetuned, "ties", density=0.3, rules=rules)
    names = [n for n, t in base.items() if t.is_floating_point() and not n.startswith("head") and n not in rules["keep_base"]]
    expected = flattened_ties(base, finetuned, names, 0.3, 1.0)
    for name in names:
        torch.testing.assert_close(merged[name].double(), expected[name], rtol=0, atol=1e-6)
    assert torch.equal(merged["pos_embed"], base["pos_embed"]) and "head.weight" not in merged


def test_model_scope_on_lora_adapters_uses_the_dense_deltas_of_the_adapted_layers(models):
    base, _ = models
    generator = torch.Generator().manual_seed(3)
    adapted = ["blocks.0.attn.qkv.weight", "blocks.1.mlp.fc1.weight"]
    adapters, finetuned = [], []
    for _ in range(3):
        factors = {}
        for name in adapted:
            out_features, in_features = base[name].shape
            factors[name.removesuffix(".weight") + ".lora_A"] = torch.randn(2, in_features, generator=generator)
            factors[name.removesuffix(".weight") + ".lora_B"] = torch.randn(out_features, 2, generator=generator)
        adapter = LoraAdapter.from_state_dict(factors, alpha=2.0)
        adapters.append(adapter)
        delta = {n: adapter.delta(n, device=torch.device("cpu"), dtype=torch.float64).view(base[n].shape) for n in adapted}
        finetuned.append({n: base[n].double() + delta[n] for n in adapted})
    merged = merge(base, adapters, "ties", density=0.25)
    expected = flattened_ties(base, finetuned, adapted, 0.25, 1.0)
    for name in adapted:
        torch.testing.assert_close(merged[name].double(), expected[name], rtol=0, atol=1e-5)


def test_disjoint_sum_skips_the_division(models):
    base, finetuned = models
    mean = merge(base, finetuned, "ties", density=1.0, trim_scope="tensor")
    summed = merge(base, finetuned, "ties", density=1.0, trim_scope="tensor", disjoint="sum")
    name = "blocks.1.attn.proj.weight"
    tv = torch.stack([m[name] - base[name] for m in finetuned])
    sign = torch.where(tv.sum(0) >= 0, 1.0, -1.0)
    agree = tv * (torch.sign(tv) == sign)
    torch.testing.assert_close(summed[name], base[name] + agree.sum(0), rtol=0, atol=1e-6)
    torch.testing.assert_close(mean[name], base[name] + agree.sum(0) / (agree != 0).sum(0).clamp(min=1), rtol=0, atol=1e-6)


def test_topk_convention_needs_tensor_scope(models):
    base, finetuned = models
    with pytest.raises(UserError, match="^parameters.trim: trim: topk .* needs trim_scope: tensor"):
        merge(base, finetuned, "ties", trim="topk")
    merge(base, finetuned, "ties", trim="topk", trim_scope="tensor")


def test_a_model_mixing_float64_and_float32_tensors_trims_exactly(models):
    """The cut-off is selected in float64 and rounded up for float32 rows: the same entries survive."""
    base, finetuned = models
    name = "blocks.0.attn.proj.weight"
    base = {**base, name: base[name].double()}
    finetuned = [{**m, name: m[name].double()} for m in finetuned]
    merged = merge(base, finetuned, "ties", density=0.2)
    names = [n for n, t in base.items() if t.is_floating_point()]
    expected = flattened_ties(base, finetuned, names, 0.2, 1.0)
    for n in names:
        torch.testing.assert_close(merged[n].double(), expected[n], rtol=0, atol=1e-6)
    assert merged[name].dtype == torch.float64


def test_a_float64_cut_off_is_rounded_up_for_float32_tensors():
    """The 2nd largest magnitude, 1 + 2^-30, lives in a float64 tensor; the float32 tensor's 1.0 is
    below it and must go (rounding the cut-off to the nearest float32, 1.0, would keep it)."""
    cut = 1.0 + 2.0**-30
    base = {"a": torch.zeros(2, dtype=torch.float64), "b": torch.zeros(2)}
    finetuned = [{"a": torch.tensor([cut, 3.0], dtype=torch.float64), "b": torch.tensor([1.0, 0.5])}]
    merged = merge(base, finetuned, "ties", density=0.5)  # k = 2 of 4 entries
    assert merged["a"].tolist() == [cut, 3.0] and merged["b"].tolist() == [0.0, 0.0]
