"""mergekit's nearswap, ram, ramplus_tl and arcee_fusion against clpeft's, tensor by tensor, on random state dicts.

mergekit (``pip install "mergekit>=0.1.5"``) is imported at test time and its methods are called
through its own registry on a ``TensorGroup``, as in tests/reference/test_mergekit_methods.py
(whose inputs and helpers these tests share); without it every test here skips with one line.
RAM's inputs are made sparse (each fine-tune changes a random part of each tensor), as RL
fine-tunes are, so that unique, shared and unchanged entries all occur. Tolerance 1e-12 absolute
on float64 weights unless a test says otherwise.

Deliberate differences, each shown here: ramplus_tl's ``lambda_k`` is formed in the weights'
dtype (mergekit's in float32) and a model that changes nothing in a tensor is ignored (mergekit's
``0 / 0`` makes the tensor NaN with ``epsilon: 0``); arcee_fusion's quartiles are exact
(mergekit's come from a random sample of 1M entries for larger tensors); bf16 inputs are merged
in float32 and rounded once.

Mutations checked to fail here: nearswap's 1e-6 floor at 1e-7, ram's ``|tau| > epsilon`` as ``>=``,
ramplus_tl without the ``alpha`` clamp, arcee_fusion's 1.5 at 1.4, its 1e-8 at 0, and the
quartile index ``floor(q (n - 1))`` as ``round``.
"""

from __future__ import annotations

import pytest
import torch

from clpeft.merging import merge

pytest.importorskip("mergekit", reason="mergekit is not installed: pip install 'mergekit>=0.1.5'")
import mergekit.merge_methods.arcee_fusion as mergekit_fusion  # noqa: E402

from .test_mergekit_methods import assert_equal, reference, state_dicts  # noqa: E402


def sparse_state_dicts(tasks: int, density: float, seed: int = 0, dtype: torch.dtype = torch.float64):
    """:func:`state_dicts` whose fine-tunes each change only a ``density`` fraction of the entries."""
    base, finetuned = state_dicts(tasks, seed=seed, dtype=dtype)
    generator = torch.Generator().manual_seed(seed + 100)
    return base, [{k: torch.where(torch.rand(v.shape, generator=generator) < density, v, base[k]) for k, v in m.items()} for m in finetuned]


def exactly_representable(base, finetuned):
    """Weights with bf16 mantissas in float64: ``theta_0 + (theta_k - theta_0)`` is ``theta_k`` exactly, so
    the fine-tuned weights clpeft forms from the task vector are the ones mergekit reads."""
    return ({k: v.bfloat16().double() for k, v in base.items()}, [{k: v.bfloat16().double() for k, v in m.items()} for m in finetuned])


# ------------------------------------------------------------------ nearswap


@pytest.mark.parametrize("t", [0.0, 1e-7, 0.01, 0.05, 1.0])
def test_nearswap_equals_mergekit(t):
    base, finetuned = state_dicts(1)
    finetuned[0]["linear.bias"][:3] = base["linear.bias"][:3] + torch.tensor([5e-7, -2e-7, 0.0], dtype=torch.float64)  # below the floor
    assert_equal(merge(base, finetuned, "nearswap", t=t), reference("nearswap", base, finetuned, t=t))


# ------------------------------------------------------------------ ram, ramplus_tl


def assert_equal_up_to_float32_lambda(ours, theirs, base) -> None:
    """``|ours - theirs| <= 2^-24 |tau_m| + 1e-12`` per entry: mergekit's lambda_k rounded to float32."""
    for key in base:
        bound = (ours[key] - base[key]).abs().mul_(2**-24).add_(1e-12)
        assert ((ours[key] - theirs[key]).abs() <= bound).all(), key


@pytest.mark.parametrize(("tasks", "density"), [(2, 0.3), (3, 0.5), (4, 0.2), (3, 1.0)])
@pytest.mark.parametrize("epsilon", [0.0, 1e-5, 0.05])
def test_ram_equals_mergekit(tasks, density, epsilon):
    base, finetuned = sparse_state_dicts(tasks, density, seed=tasks)
    assert_equal(merge(base, finetuned, "ram", epsilon=epsilon), reference("ram", base, finetuned, epsilon=epsilon))


@pytest.mark.parametrize(("tasks", "density"), [(2, 0.3), (3, 0.5), (4, 0.2)])
@pytest.mark.parametrize(("r", "alpha", "epsilon"), [(0.1, 0.2, 1e-5), (0.5, 3.0, 1e-5), (1.0, 0.5, 0.05), (0.0, 0.2, 1e-5)])
def test_ramplus_tl_equals_mergekit_up_to_its_float32_lambda(tasks, density, r, alpha, epsilon):
    """mergekit divides integer counts, so its lambda_k is float32 (torch's default dtype) even for float64
    weights: the unique entries differ by lambda_k's float32 rounding (at most 2^-24 of the merged task
    vector here); the others agree to 1e-12."""
    base, finetuned = sparse_state_dicts(tasks, density, seed=tasks)
    parameters = {"r": r, "alpha": alpha, "epsilon": epsilon}
    ours, theirs = merge(base, finetuned, "ramplus_tl", **parameters), reference("ramplus_tl", base, finetuned, **parameters)
    ram = merge(base, finetuned, "ram", epsilon=epsilon)
    scaled = {k: ours[k] != ram[k] for k in base}  # the unique entries whose lambda_k is not 1
    assert_equal_up_to_float32_lambda(ours, theirs, base)
    for key in base:
        torch.testing.assert_close(ours[key][~scaled[key]], theirs[key][~scaled[key]], rtol=0, atol=1e-12, msg=key)
    assert (r == 0.0) == (not any(m.any() for m in scaled.values()))


def test_ramplus_tl_ignores_a_model_that_changes_nothing_where_mergekit_gives_nan():
    """epsilon 0 and a fine-tune equal to the base: u_k = s_k = 0, mergekit's rho_k = 0/0 = NaN reaches every
    entry (NaN * 0); clpeft merges as if the model were not there, which is mergekit's result without it."""
    base, finetuned = sparse_state_dicts(2, 0.4)
    with_unchanged = [*finetuned, {k: v.clone() for k, v in base.items()}]
    theirs = reference("ramplus_tl", base, with_unchanged, epsilon=0.0)
    assert all(torch.isnan(v).all() for v in theirs.values())
    ours = merge(base, with_unchanged, "ramplus_tl", epsilon=0.0)
    assert_equal_up_to_float32_lambda(ours, reference("ramplus_tl", base, finetuned, epsilon=0.0), base)


# ------------------------------------------------------------------ arcee_fusion


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("scale", [1.0, 40.0])
def test_arcee_fusion_equals_mergekit_exactly_on_tensors_of_at_most_1m_entries(seed, scale):
    """Bit for bit: the same importances, the same lower-order-statistic quartiles, the same mask. Scale 40
    makes most softmax probabilities smaller than the 1e-8 added to them."""
    base, finetuned = state_dicts(1, seed=seed)
    base, finetuned = exactly_representable({k: scale * v for k, v in base.items()}, [{k: scale * v for k, v in finetuned[0].items()}])
    ours, theirs = merge(base, finetuned, "arcee_fusion"), reference("arcee_fusion", base, finetuned)
    assert all(torch.equal(ours[k], theirs[k]) for k in base)
    assert any(not torch.equal(ours[k], base[k]) for k in base) and any(not torch.equal(ours[k], finetuned[0][k]) for k in base)


def test_arcee_fusion_quartiles_are_exact_where_mergekit_samples_them(monkeypatch):
    """A 1024 x 1025 tensor (1,049,600 entries): mergekit estimates the quartiles from 1M entries drawn with
    replacement, so two runs with other torch seeds keep other entries; clpeft's merge is mergekit's with
    the sample as large as the tensor (every entry sorted, then the same quartile indices)."""
    generator = torch.Generator().manual_seed(7)
    base = {"embed.weight": torch.randn(1024, 1025, generator=generator, dtype=torch.float64)}
    finetuned = [{"embed.weight": base["embed.weight"] + 0.05 * torch.randn(1024, 1025, generator=generator, dtype=torch.float64)}]
    base, finetuned = exactly_representable(base, finetuned)
    runs = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        runs.append(reference("arcee_fusion", base, finetuned)["embed.weight"])
    assert not torch.equal(runs[0], runs[1])
    monkeypatch.setattr(mergekit_fusion, "_QUANTILE_SAMPLE_SIZE", base["embed.weight"].numel())
    exact = reference("arcee_fusion", base, finetuned)["embed.weight"]
    ours = merge(base, finetuned, "arcee_fusion")["embed.weight"]
    assert torch.equal(ours, exact)
    assert 0 < int((runs[0] != ours).sum()) < 1e-3 * ours.numel()  # a few entries near the threshold


# ------------------------------------------------------------------ bfloat16 inputs

BF16_CASES = [  # name, parameters, models, sparse
    ("nearswap", {"t": 0.05}, 1, False),
    ("ram", {}, 3, True),
    ("ramplus_tl", {"r": 0.5, "alpha": 1.0}, 3, True),
    ("arcee_fusion", {}, 1, False),
]


@pytest.mark.parametrize(("name", "parameters", "tasks", "sparse"), BF16_CASES, ids=[c[0] for c in BF16_CASES])
def test_bf16_merges_are_the_float64_result_rounded_once(name, parameters, tasks, sparse):
    """bf16 checkpoints: clpeft merges in float32 and rounds once, giving mergekit's float64 result rounded
    to bf16 (at most one entry off by rounding); mergekit merges in bf16 itself and is further off."""
    base, finetuned = sparse_state_dicts(tasks, 0.4, seed=3, dtype=torch.bfloat16) if sparse else state_dicts(tasks, 3, torch.bfloat16)
    wide = [{k: v.double() for k, v in m.items()} for m in (base, *finetuned)]
    truth = reference(name, wide[0], wide[1:], **parameters)
    ours, theirs = merge(base, finetuned, name, **parameters), reference(name, base, finetuned, **parameters)
    ours_off = sum(int((ours[k] != truth[k].to(torch.bfloat16)).sum()) for k in base)
    theirs_off = sum(int((theirs[k] != truth[k].to(torch.bfloat16)).sum()) for k in base)
    assert all(ours[k].dtype == torch.bfloat16 for k in base)
    assert ours_off <= 1 and ours_off <= theirs_off
