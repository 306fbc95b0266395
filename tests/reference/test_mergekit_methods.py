"""mergekit's merge methods against clpeft's, tensor by tensor, on random state dicts.

mergekit (arcee-ai/mergekit, ``pip install "mergekit>=0.1.5"``) is imported at test time and
called through its own method objects (``mergekit.merge_methods.registry.get(name)`` on a
``TensorGroup``), the path ``mergekit-yaml`` takes; without it every test here skips with one
line. Inputs: a float64 base state dict of four shapes (a Linear weight, a bias, a conv kernel,
a LayerNorm weight) and fine-tunes that move each tensor by its own amount. Tolerance 1e-12
absolute on float64 weights (the same arithmetic in another order) unless a test says otherwise.

Random methods (DELLA) get the same draws on both sides: mergekit's ``torch.bernoulli`` is fed
from a generator seeded as the one clpeft's engine would pass.

Deliberate differences, each shown by a test here and explained in docs/merging.md:
``linear``'s ``normalize: false`` is refused where it would scale the base; the TIES-style sign
election (breadcrumbs, della) is on the unweighted mass; ``filter_wise`` Model Stock and DELLA's
ranks use a conv kernel's output rows; SCE has no absolute 1e-6 thresholds; equal magnitudes
rank by position; bf16 inputs are merged in float32 and rounded once (mergekit merges several
methods in bf16 arithmetic).
"""

from __future__ import annotations

import pytest
import torch

from clpeft.errors import UserError
from clpeft.merging import get_method, merge
from clpeft.merging.methods.breadcrumbs import keep_magnitude_band_

pytest.importorskip("mergekit", reason="mergekit is not installed: pip install 'mergekit>=0.1.5'")
from mergekit.merge_methods.base import TensorGroup  # noqa: E402
from mergekit.merge_methods.registry import get as mergekit_method  # noqa: E402

ATOL = 1e-12
SHAPES = {"linear.weight": (12, 7), "linear.bias": (12,), "conv.weight": (5, 3, 2, 2), "norm.weight": (9,)}


def state_dicts(tasks: int, seed: int = 0, dtype: torch.dtype = torch.float64):
    """A base and ``tasks`` fine-tunes; each fine-tune moves each tensor by its own amount."""
    generator = torch.Generator().manual_seed(seed)
    base = {k: torch.randn(s, generator=generator, dtype=torch.float64) for k, s in SHAPES.items()}
    finetuned = []
    for _ in range(tasks):
        sizes = torch.rand(len(base), generator=generator, dtype=torch.float64) * 0.1 + 1e-2
        finetuned.append(
            {k: v + s * torch.randn(v.shape, generator=generator, dtype=torch.float64) for (k, v), s in zip(base.items(), sizes)}
        )
    return {k: v.to(dtype) for k, v in base.items()}, [{k: v.to(dtype) for k, v in m.items()} for m in finetuned]


def reference(name: str, base, finetuned, *, with_base: bool = True, **parameters) -> dict[str, torch.Tensor]:
    """mergekit's method ``name`` on every tensor; the base is input 0 when ``with_base``."""
    out = {}
    for key in base:
        tensors = ([base[key]] if with_base else []) + [m[key] for m in finetuned]
        group = TensorGroup.from_tensors(tensors, base_index=0 if with_base else None)
        out[key] = mergekit_method(name)([group], parameters=parameters)[0]
    return out


def assert_equal(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor], atol: float = ATOL) -> None:
    assert set(ours) == set(theirs)
    for key in ours:
        torch.testing.assert_close(ours[key], theirs[key].to(ours[key].dtype), rtol=0, atol=atol, msg=key)


# ------------------------------------------------------------------ linear


@pytest.mark.parametrize(("weights", "base_weight"), [([1.0, 1.0, 1.0], 0.0), ([0.5, 2.0, 1.5], 0.0), ([0.2, 0.3, 0.1], 0.4)])
def test_linear_equals_mergekit(weights, base_weight):
    base, finetuned = state_dicts(3)
    ours = merge(base, finetuned, "linear", weights=weights, base_weight=base_weight)
    if base_weight:  # the base listed among mergekit's models with its own weight
        theirs = reference("linear", base, finetuned, weight=[base_weight, *weights])
    else:
        theirs = reference("linear", base, finetuned, with_base=False, weight=weights)
    assert_equal(ours, theirs)


def test_linear_without_normalisation_equals_mergekit_where_the_weights_sum_to_one():
    base, finetuned = state_dicts(2)
    ours = merge(base, finetuned, "linear", weights=[0.3, 0.5], base_weight=0.2, normalize=False)
    assert_equal(ours, reference("linear", base, finetuned, weight=[0.2, 0.3, 0.5], normalize=False))


def test_linear_without_normalisation_refuses_what_mergekit_does_with_other_sums():
    """mergekit sums 2 theta_1 + 2 theta_2 (a model twice as large as either); clpeft refuses."""
    base, finetuned = state_dicts(2)
    theirs = reference("linear", base, finetuned, with_base=False, weight=[2.0, 2.0], normalize=False)
    torch.testing.assert_close(theirs["linear.bias"], 2 * finetuned[0]["linear.bias"] + 2 * finetuned[1]["linear.bias"])
    with pytest.raises(UserError, match="normalize: false with weights summing to 4"):
        merge(base, finetuned, "linear", weights=[2.0, 2.0], normalize=False)


# ------------------------------------------------------------------ slerp


@pytest.mark.parametrize("t", [0.0, 0.3, 0.5, 1.0, 1.4])
def test_slerp_equals_mergekit(t):
    base, finetuned = state_dicts(1)
    assert_equal(merge(base, finetuned, "slerp", t=t), reference("slerp", base, finetuned, t=t))


def test_slerp_on_parallel_tensors_interpolates_linearly_as_mergekit_does():
    base, _ = state_dicts(1)
    finetuned = [{k: 1.5 * v for k, v in base.items()}]  # cos Omega = 1: the linear fall-back
    assert_equal(merge(base, finetuned, "slerp", t=0.3), reference("slerp", base, finetuned, t=0.3))


# ------------------------------------------------------------------ multislerp


@pytest.mark.parametrize("origin", ["base", "zero"])
@pytest.mark.parametrize(("weights", "normalize"), [([1.0, 1.0, 1.0], True), ([0.2, 0.5, 0.9], True), ([0.2, 0.5, 0.6], False)])
def test_multislerp_equals_mergekit(origin, weights, normalize):
    base, finetuned = state_dicts(3)
    ours = merge(base, finetuned, "multislerp", weights=weights, normalize_weights=normalize, origin=origin)
    theirs = reference("multislerp", base, finetuned, with_base=origin == "base", weight=weights, normalize_weights=normalize)
    assert_equal(ours, theirs)


@pytest.mark.parametrize("origin", ["base", "zero"])
def test_multislerp_of_one_model_or_two_antipodal_ones_equals_mergekit(origin):
    base, finetuned = state_dicts(1)
    with_base = origin == "base"
    assert_equal(
        merge(base, finetuned, "multislerp", origin=origin), reference("multislerp", base, finetuned, with_base=with_base, weight=[1.0])
    )
    antipodal = [finetuned[0], {k: 2 * base[k] - v if with_base else -v for k, v in finetuned[0].items()}]  # x_2 = -x_1
    ours = merge(base, antipodal, "multislerp", weights=[1.0, 1.0], origin=origin)
    assert_equal(ours, reference("multislerp", base, antipodal, with_base=with_base, weight=[1.0, 1.0]))


# ------------------------------------------------------------------ nuslerp


@pytest.mark.parametrize("origin", ["base", "zero"])
@pytest.mark.parametrize(("flatten", "row_wise"), [(True, False), (False, False), (False, True)])
@pytest.mark.parametrize("weights", [[1.0, 1.0], [0.3, 0.9], [1.0, -1.0]])
def test_nuslerp_equals_mergekit(origin, flatten, row_wise, weights):
    base, finetuned = state_dicts(2)
    ours = merge(base, finetuned, "nuslerp", weights=weights, flatten=flatten, row_wise=row_wise, origin=origin)
    parameters = {"weight": weights, "nuslerp_flatten": flatten, "nuslerp_row_wise": row_wise}
    assert_equal(ours, reference("nuslerp", base, finetuned, with_base=origin == "base", **parameters))


def test_nuslerp_of_parallel_rows_interpolates_them_linearly_as_mergekit_does():
    base, finetuned = state_dicts(2)
    finetuned[1] = {k: base[k] + 3 * (v - base[k]) for k, v in finetuned[0].items()}  # tau_2 = 3 tau_1
    ours = merge(base, finetuned, "nuslerp", weights=[1.0, 2.0], flatten=False)
    assert_equal(ours, reference("nuslerp", base, finetuned, weight=[1.0, 2.0], nuslerp_flatten=False))


# ------------------------------------------------------------------ karcher


@pytest.mark.parametrize("include_base", [False, True])
@pytest.mark.parametrize(("tasks", "max_iter", "tol"), [(3, 10, 1e-5), (2, 1, 1e-5), (4, 50, 1e-9)])
def test_karcher_equals_mergekit(include_base, tasks, max_iter, tol):
    base, finetuned = state_dicts(tasks)
    ours = merge(base, finetuned, "karcher", max_iter=max_iter, tol=tol, include_base=include_base)
    assert_equal(ours, reference("karcher", base, finetuned, with_base=include_base, max_iter=max_iter, tol=tol))


def test_karcher_leaves_out_zero_models_as_mergekit_does():
    base, finetuned = state_dicts(2)
    finetuned.append({k: torch.zeros_like(v) for k, v in base.items()})
    assert_equal(merge(base, finetuned, "karcher"), reference("karcher", base, finetuned, with_base=False))


# ------------------------------------------------------------------ model_stock


@pytest.mark.parametrize("tasks", [2, 3, 5])
@pytest.mark.parametrize("filter_wise", [False, True])
def test_model_stock_equals_mergekit(tasks, filter_wise):
    base, finetuned = state_dicts(tasks)
    ours = merge(base, finetuned, "model_stock", filter_wise=filter_wise)
    theirs = reference("model_stock", base, finetuned, filter_wise=filter_wise)
    if filter_wise:  # a filter of a conv kernel: clpeft's is an output channel, mergekit's a slice along the last axis
        assert not torch.allclose(ours.pop("conv.weight"), theirs.pop("conv.weight"), rtol=0, atol=1e-6)
    assert_equal(ours, theirs)


def test_model_stock_keeps_the_base_where_mergekit_does():
    """Two opposite task vectors: cos = -1, 1 + (k - 1) cos = 0, the singular case: the base."""
    base, finetuned = state_dicts(1)
    finetuned.append({k: 2 * base[k] - v for k, v in finetuned[0].items()})
    ours = merge(base, finetuned, "model_stock")
    assert_equal(ours, reference("model_stock", base, finetuned))
    assert_equal(ours, base)


# ------------------------------------------------------------------ breadcrumbs


@pytest.mark.parametrize(("density", "gamma"), [(0.9, 0.01), (0.5, 0.1), (0.3, 0.8), (1.0, 0.1)])
@pytest.mark.parametrize("rescale", [False, True])
def test_breadcrumbs_equals_mergekit(density, gamma, rescale):
    base, finetuned = state_dicts(3)
    weights = [0.5, 1.0, 2.0]
    ours = merge(base, finetuned, "breadcrumbs", density=density, gamma=gamma, rescale=rescale, weights=weights, scale=0.7)
    theirs = reference("breadcrumbs", base, finetuned, density=density, gamma=gamma, rescale=rescale, weight=weights, **{"lambda": 0.7})
    assert_equal(ours, theirs)


@pytest.mark.parametrize(("disjoint", "normalize"), [("sum", False), ("mean", True)])
def test_breadcrumbs_ties_equals_mergekit_with_equal_weights(disjoint, normalize):
    base, finetuned = state_dicts(3)
    ours = merge(base, finetuned, "breadcrumbs", density=0.5, gamma=0.1, consensus="ties", disjoint=disjoint, scale=0.7)
    parameters = {"density": 0.5, "gamma": 0.1, "weight": [1.0] * 3, "normalize": normalize, "lambda": 0.7}
    assert_equal(ours, reference("breadcrumbs_ties", base, finetuned, **parameters))


def test_breadcrumbs_ties_elects_signs_on_the_unweighted_mass_where_mergekit_weighs_it():
    """clpeft elects sign(sum_k tau_k) (TIES' paper, peft, the official code); mergekit sign(sum_k w_k tau_k).
    With unequal weights the results differ exactly where the two elections differ."""
    base, finetuned = state_dicts(3)
    weights = [0.2, 1.0, 3.0]
    ours = merge(base, finetuned, "breadcrumbs", density=0.5, gamma=0.1, consensus="ties", weights=weights)
    theirs = reference("breadcrumbs_ties", base, finetuned, density=0.5, gamma=0.1, weight=weights)
    elections_differ = 0
    for k in base:
        kept = keep_magnitude_band_(torch.stack([(m[k] - base[k]).reshape(-1) for m in finetuned]), 0.5, 0.1)
        unweighted, weighted = kept.sum(0) >= 0, torch.tensor(weights, dtype=kept.dtype) @ kept >= 0
        differs = (ours[k] - theirs[k]).abs().reshape(-1) > 1e-9
        assert torch.equal(differs, unweighted != weighted), k
        elections_differ += int(differs.sum())
    assert elections_differ > 0


# ------------------------------------------------------------------ della


def della_pair(name: str, base, finetuned, seed: int, ours: dict, theirs: dict):
    """clpeft's della (called per tensor with a generator seeded ``seed``) and mergekit's ``name`` with
    its ``torch.bernoulli`` drawing from a generator seeded the same: the same masks on both sides."""
    method, draw = get_method("della"), torch.bernoulli
    merged_ours, merged_theirs = {}, {}
    for key in SHAPES:
        taus = torch.stack([(m[key] - base[key]).reshape(-1) for m in finetuned])
        generator = torch.Generator().manual_seed(seed)
        delta = method.fn(taus, **method.validate(ours), generator=generator, shape=SHAPES[key])
        merged_ours[key] = base[key] + delta.view(SHAPES[key])
        generator = torch.Generator().manual_seed(seed)
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(torch, "bernoulli", lambda p: draw(p, generator=generator))
            merged_theirs[key] = reference(name, {key: base[key]}, [{key: m[key]} for m in finetuned], **theirs)[key]
    return merged_ours, merged_theirs


@pytest.mark.parametrize(("density", "epsilon"), [(0.7, 0.15), (0.4, 0.3), (0.9, 0.05)])
@pytest.mark.parametrize("rescale", [True, False])
def test_della_equals_mergekit_with_the_same_draws(density, epsilon, rescale):
    """float32 inputs (mergekit computes DELLA's masks and rescale in float32 on the CPU): 2e-6 absolute."""
    base, finetuned = state_dicts(3, dtype=torch.float32)
    ours = {"density": density, "epsilon": epsilon, "rescale": "l1" if rescale else "none", "scale": 0.8}
    theirs = {"density": density, "epsilon": epsilon, "rescale": rescale, "weight": [1.0] * 3, "lambda": 0.8}
    merged_ours, merged_theirs = della_pair("della", base, finetuned, 5, ours, theirs)
    conv = "conv.weight"  # mergekit ranks a conv kernel along its second axis, clpeft along its output rows
    assert not torch.allclose(merged_ours.pop(conv), merged_theirs.pop(conv), rtol=0, atol=1e-4)
    assert_equal(merged_ours, merged_theirs, atol=2e-6)


@pytest.mark.parametrize("rescale", [True, False])
def test_della_linear_equals_mergekit_with_the_same_draws(rescale):
    base, finetuned = state_dicts(3, dtype=torch.float32)
    weights = [0.5, 1.0, 2.0]
    ours = {"density": 0.6, "epsilon": 0.2, "rescale": "l1" if rescale else "none", "consensus": "sum", "weights": weights}
    theirs = {"density": 0.6, "epsilon": 0.2, "rescale": rescale, "weight": weights}
    merged_ours, merged_theirs = della_pair("della_linear", base, finetuned, 9, ours, theirs)
    merged_ours.pop("conv.weight"), merged_theirs.pop("conv.weight")
    assert_equal(merged_ours, merged_theirs, atol=2e-6)


# ------------------------------------------------------------------ sce


@pytest.mark.parametrize("select_topk", [1.0, 0.5, 0.1, 0.0])
@pytest.mark.parametrize("trim", ["threshold", "topk"])
def test_sce_equals_mergekit(select_topk, trim):
    base, finetuned = state_dicts(3)
    ours = merge(base, finetuned, "sce", select_topk=select_topk, trim=trim)
    assert_equal(ours, reference("sce", base, finetuned, select_topk=select_topk))


def test_sce_weights_small_task_vectors_by_their_mass_where_mergekit_weighs_them_equally():
    """Task vectors of mean square ~1e-8 (their sum under mergekit's absolute 1e-6): mergekit falls back to
    equal weights, clpeft keeps the paper's w_k = mean(tau_k^2) / sum_j mean(tau_j^2)."""
    base, finetuned = state_dicts(3)
    small = [{k: base[k] + 1e-3 * (m[k] - base[k]) * (i + 1) for k in base} for i, m in enumerate(finetuned)]
    ours, theirs = merge(base, small, "sce"), reference("sce", base, small)
    assert not torch.allclose(ours["linear.weight"], theirs["linear.weight"], rtol=0, atol=1e-9)
    for key in base:  # by hand: the paper's weights over the agreeing task vectors
        taus = torch.stack([(m[key] - base[key]).reshape(-1) for m in small])
        mass = taus.square().mean(1)
        agree = (taus * torch.where(taus.sum(0) >= 0, 1.0, -1.0) > 0).double() * (mass / mass.sum())[:, None]
        expected = base[key] + ((agree * taus).sum(0) / agree.sum(0)).view(base[key].shape)
        torch.testing.assert_close(ours[key], expected, rtol=0, atol=ATOL)


# ------------------------------------------------------------------ bfloat16 inputs

BF16_CASES = [  # name, clpeft parameters, mergekit parameters, models, mergekit's base input
    ("linear", {"weights": [1.0, 2.0, 3.0]}, {"weight": [1.0, 2.0, 3.0]}, 3, False),
    ("slerp", {"t": 0.3}, {"t": 0.3}, 1, True),
    ("multislerp", {}, {"weight": [1.0] * 3}, 3, True),
    ("nuslerp", {"weights": [1.0, 2.0]}, {"weight": [1.0, 2.0]}, 2, True),
    ("karcher", {}, {}, 3, False),
    ("model_stock", {}, {}, 3, True),
    ("sce", {}, {}, 3, True),
]


@pytest.mark.parametrize(("name", "ours", "theirs", "tasks", "with_base"), BF16_CASES, ids=[c[0] for c in BF16_CASES])
def test_bf16_merges_are_the_float64_result_rounded_once(name, ours, theirs, tasks, with_base):
    """bf16 checkpoints: clpeft forms task vectors and merges in float32 and rounds once, so it gives mergekit's
    float64 result rounded to bf16 (at most one entry off by rounding); mergekit computes multislerp, nuslerp,
    karcher, model_stock and sce in bf16 itself, and is off on 10-85% of the entries here."""
    base, finetuned = state_dicts(tasks, seed=3, dtype=torch.bfloat16)
    wide = [{k: v.double() for k, v in m.items()} for m in (base, *finetuned)]
    truth = reference(name, wide[0], wide[1:], with_base=with_base, **theirs)
    merged, theirs_bf16 = merge(base, finetuned, name, **ours), reference(name, base, finetuned, with_base=with_base, **theirs)
    ours_off = sum(int((merged[k] != truth[k].to(torch.bfloat16)).sum()) for k in base)
    theirs_off = sum(int((theirs_bf16[k] != truth[k].to(torch.bfloat16)).sum()) for k in base)
    assert all(merged[k].dtype == torch.bfloat16 for k in base)
    assert ours_off <= 1 and ours_off <= theirs_off


def test_bf16_breadcrumbs_keeps_the_same_magnitudes_as_mergekit_among_ties():
    """Task vectors of bf16 weights repeat magnitudes; both keep the same band of ranks, so the same multiset
    of magnitudes, but among equal magnitudes clpeft keeps the first positions and mergekit's sort any."""
    from mergekit.sparsify import magnitude_outliers

    base, finetuned = state_dicts(3, seed=3, dtype=torch.bfloat16)
    for key in base:
        taus = torch.stack([(m[key].float() - base[key].float()).reshape(-1) for m in finetuned])
        assert taus.abs().unique().numel() < taus.numel()  # ties present
        ours = keep_magnitude_band_(taus.clone(), 0.5, 0.1)
        for row, tau in zip(ours, taus):
            theirs = magnitude_outliers(tau, 0.5, gamma=0.1)
            assert torch.equal(row.abs().sort().values, theirs.abs().sort().values), key
