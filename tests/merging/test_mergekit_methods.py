"""The methods mergekit users know (linear, SLERP, Model Stock, ...) against their papers' formulas.

Their equality with mergekit's own implementation is in tests/reference/test_mergekit_methods.py;
these tests need no mergekit: each checks a method against an independent float64 computation
of its formula, its edge cases and its one-line errors.
"""

from __future__ import annotations

import math

import pytest
import torch

from clpeft.errors import UserError
from clpeft.merging import get_method, merge
from clpeft.merging.methods.della import keep_probabilities


@pytest.fixture
def models():
    """A float64 base of two tensors and three fine-tunes of it."""
    generator = torch.Generator().manual_seed(0)
    base = {"w": torch.randn(6, 5, generator=generator, dtype=torch.float64), "b": torch.randn(6, generator=generator, dtype=torch.float64)}
    tuned = [{k: v + 0.1 * torch.randn(v.shape, generator=generator, dtype=torch.float64) for k, v in base.items()} for _ in range(3)]
    return base, tuned


def test_linear_is_the_weighted_average_of_the_models(models):
    base, tuned = models
    merged = merge(base, tuned, "linear", weights=[1.0, 2.0, 3.0], base_weight=2.0)
    for k in base:
        expected = (2 * base[k] + 1 * tuned[0][k] + 2 * tuned[1][k] + 3 * tuned[2][k]) / 8
        torch.testing.assert_close(merged[k], expected, rtol=0, atol=1e-12)


def test_linear_weights_are_relative_and_its_coefficients_known():
    method = get_method("linear")
    assert method.linear
    assert method.coefficients(2, method.validate({"weights": [2.0, 6.0]})) == [0.25, 0.75]
    assert method.coefficients(2, method.validate({"weights": [2.0, 6.0], "base_weight": 8.0})) == [0.125, 0.375]


def test_linear_refuses_weights_that_cannot_be_averaged(models):
    base, tuned = models
    with pytest.raises(UserError, match="sum to 0"):
        merge(base, tuned[:2], "linear", weights=[1.0, -1.0])
    with pytest.raises(UserError, match="normalize: false with weights summing to 3"):
        merge(base, tuned, "linear", normalize=False)


def test_slerp_follows_the_great_circle_between_the_base_and_the_model():
    """Orthogonal tensors of norms 1 and 2: at t the result is cos/sin of t * pi/2, scaled as SLERP scales."""
    base = {"w": torch.tensor([1.0, 0.0], dtype=torch.float64)}
    tuned = [{"w": torch.tensor([0.0, 2.0], dtype=torch.float64)}]
    for t in (0.0, 0.25, 0.5, 1.0):
        expected = torch.tensor([math.cos(t * math.pi / 2), 2 * math.sin(t * math.pi / 2)], dtype=torch.float64)
        torch.testing.assert_close(merge(base, tuned, "slerp", t=t)["w"], expected, rtol=0, atol=1e-12)


def test_slerp_takes_one_model(models):
    base, tuned = models
    with pytest.raises(UserError, match="exactly one fine-tuned model, got 3"):
        merge(base, tuned, "slerp")
    assert get_method("slerp").tensor_inputs == {"base"} and "base" not in get_method("slerp").parameters


def test_multislerp_of_orthogonal_unit_vectors_is_their_spherical_midpoint():
    """Two orthonormal task vectors, equal weights: the point at 45 degrees, of norm 1."""
    base = {"w": torch.zeros(3, dtype=torch.float64)}
    tuned = [{"w": torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)}, {"w": torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64)}]
    expected = torch.tensor([math.sqrt(0.5), math.sqrt(0.5), 0.0], dtype=torch.float64)
    torch.testing.assert_close(merge(base, tuned, "multislerp", eps=0.0)["w"], expected, rtol=0, atol=1e-12)


def test_multislerp_refuses_a_vanishing_mean_direction():
    base = {"w": torch.zeros(2, dtype=torch.float64)}
    tuned = [{"w": torch.tensor(v, dtype=torch.float64)} for v in ([1.0, 0.0], [-1.0, 0.0], [0.0, 0.0])]
    with pytest.raises(UserError, match="weighted mean direction of the models is zero"):
        merge(base, tuned, "multislerp", weights=[1.0, 1.0, 0.0])


def test_nuslerp_interpolates_each_row_on_its_own_circle():
    """Rows [1, 0] -> [0, 1] and [2, 0] -> [0, -2]: each moves along its own quarter circle."""
    base = {"w": torch.zeros(2, 2, dtype=torch.float64)}
    tuned = [
        {"w": torch.tensor([[1.0, 0.0], [2.0, 0.0]], dtype=torch.float64)},
        {"w": torch.tensor([[0.0, 1.0], [0.0, -2.0]], dtype=torch.float64)},
    ]
    merged = merge(base, tuned, "nuslerp", weights=[2.0, 1.0], flatten=False)["w"]  # t = 1/3: 30 degrees
    c, s = math.cos(math.pi / 6), math.sin(math.pi / 6)
    torch.testing.assert_close(merged, torch.tensor([[c, s], [2 * c, -2 * s]], dtype=torch.float64), rtol=0, atol=1e-12)
    with pytest.raises(UserError, match="exactly two fine-tuned models, got 1"):
        merge(base, tuned[:1], "nuslerp")


def test_karcher_mean_of_three_directions_is_their_spherical_centre():
    """Unit vectors at -60, 0 and +60 degrees (norms 1, 2, 3): the centre is 0 degrees, scaled by the mean norm 2."""
    base = {"w": torch.zeros(2, dtype=torch.float64)}
    angles = (-math.pi / 3, 0.0, math.pi / 3)
    tuned = [{"w": n * torch.tensor([math.cos(a), math.sin(a)], dtype=torch.float64)} for n, a in zip((1.0, 2.0, 3.0), angles)]
    torch.testing.assert_close(merge(base, tuned, "karcher")["w"], torch.tensor([2.0, 0.0], dtype=torch.float64), rtol=0, atol=1e-12)


def test_karcher_mean_minimises_the_sum_of_squared_angles():
    """Asymmetric directions: the Karcher mean's angle is the mean of the angles (on a great circle)."""
    base = {"w": torch.zeros(2, dtype=torch.float64)}
    angles = (0.1, 0.3, 1.1)
    tuned = [{"w": torch.tensor([math.cos(a), math.sin(a)], dtype=torch.float64)} for a in angles]
    merged = merge(base, tuned, "karcher", max_iter=100, tol=1e-12)["w"]
    assert math.atan2(merged[1], merged[0]) == pytest.approx(sum(angles) / 3, abs=1e-10)


def test_model_stock_ratio_follows_the_angle(models):
    """Eq. 2 of the paper computed by hand in float64 for one tensor, per tensor and per output row."""
    base, tuned = models
    merged = merge(base, tuned, "model_stock")
    merged_rows = merge(base, tuned, "model_stock", filter_wise=True)
    taus = torch.stack([m["w"] - base["w"] for m in tuned])  # (3, 6, 5)

    def ratio(vectors):  # vectors: (3, n)
        unit = vectors / vectors.norm(dim=1, keepdim=True)
        cos = (unit @ unit.T)[torch.triu_indices(3, 3, 1).unbind()].mean()
        return 3 * cos / (1 + 2 * cos)

    torch.testing.assert_close(merged["w"], base["w"] + ratio(taus.reshape(3, -1)) * taus.mean(0), rtol=0, atol=1e-12)
    expected_rows = torch.stack([base["w"][r] + ratio(taus[:, r]) * taus[:, r].mean(0) for r in range(6)])
    torch.testing.assert_close(merged_rows["w"], expected_rows, rtol=0, atol=1e-12)
    with pytest.raises(UserError, match="needs at least two, got 1"):
        merge(base, tuned[:1], "model_stock")


def test_breadcrumbs_keeps_the_band_below_the_outliers():
    """Magnitudes 1..10: gamma 0.2 drops 10 and 9, density 0.5 keeps 8..4, the rest (3..1) goes."""
    values = torch.tensor([[3.0, -10.0, 1.0, 7.0, -5.0, 9.0, 2.0, -8.0, 4.0, 6.0]], dtype=torch.float64)
    kept = get_method("breadcrumbs").fn(values.clone(), density=0.5, gamma=0.2)
    torch.testing.assert_close(kept, torch.tensor([0.0, 0.0, 0.0, 7.0, -5.0, 0.0, 0.0, -8.0, 4.0, 6.0], dtype=torch.float64))
    rescaled = get_method("breadcrumbs").fn(values.clone(), density=0.5, gamma=0.2, rescale=True)
    torch.testing.assert_close(rescaled, kept * 55 / 30)  # L1 norm 55 before, 30 after


def test_breadcrumbs_ranks_equal_magnitudes_by_position():
    """Eight equal magnitudes, keep four below the top two: always positions 2..5 (a stable sort)."""
    values = torch.tensor([[1.0, -1.0, 1.0, 1.0, -1.0, 1.0, -1.0, 1.0]])
    kept = get_method("breadcrumbs").fn(values.clone(), density=0.5, gamma=0.25)
    torch.testing.assert_close(kept, torch.tensor([0.0, 0.0, 1.0, 1.0, -1.0, 1.0, 0.0, 0.0]))


def test_della_keep_probabilities_grow_linearly_with_the_magnitude_rank():
    magnitudes = torch.tensor([[0.3, 0.1, 0.5, 0.2, 0.4]])
    expected = torch.tensor([[0.6, 0.4, 0.8, 0.5, 0.7]])  # density 0.6 +- 0.2 by rank 2, 0, 4, 1, 3
    torch.testing.assert_close(keep_probabilities(magnitudes, 0.6, 0.2), expected)


def test_della_probability_rescale_keeps_the_expected_task_vector():
    """Each entry is kept with p_i and divided by p_i: the mean over many draws is the task vector (the paper)."""
    tau = torch.linspace(-1.0, 1.0, 50, dtype=torch.float64)
    generator = torch.Generator().manual_seed(0)
    draws = torch.stack(
        [
            get_method("della").fn(tau[None].clone(), density=0.5, epsilon=0.3, rescale="probability", generator=generator, shape=(50,))
            for _ in range(4000)
        ]
    )
    frequency = (draws != 0).double().mean(0)[tau.abs().argsort()]  # by rising magnitude: p from 0.2 to 0.8
    assert frequency[:10].mean() < 0.3 and frequency[-10:].mean() > 0.7 and 0.45 < frequency.mean() < 0.55
    torch.testing.assert_close(draws.mean(0), tau, rtol=0, atol=0.08)


def test_della_refuses_probabilities_outside_zero_one(models):
    base, tuned = models
    with pytest.raises(UserError, match=r"density \+- epsilon must lie inside \(0, 1\), got 0.9 \+- 0.15"):
        merge(base, tuned, "della", density=0.9)


def test_sce_selects_by_variance_and_weights_by_mass():
    """Variances 0, 4, 4, 1/16, 1: entry 0 is not counted, 3/4 of the other four keeps entries 1, 2 and 4.
    Masses of the selected rows 6/5 and 22/5; entry 1 sums to 0 (+ elected), entry 4 agrees: (6 + 66) / 28."""
    taus = torch.tensor([[1.0, 2.0, -1.0, 0.5, 1.0], [1.0, -2.0, 3.0, 0.0, 3.0]], dtype=torch.float64)
    merged = get_method("sce").fn(taus.clone(), select_topk=0.75)
    torch.testing.assert_close(merged, torch.tensor([0.0, 2.0, 3.0, 0.0, 18 / 7], dtype=torch.float64), rtol=0, atol=1e-12)


def test_sce_keeps_every_entry_tied_at_the_cut_unless_asked_for_exactly_k():
    taus = torch.tensor([[1.0, -1.0, 1.0, 2.0], [-1.0, 1.0, -1.0, 0.0]])  # variances 1, 1, 1, 1
    assert int(get_method("sce").fn(taus.clone(), select_topk=0.5).count_nonzero()) == 4
    assert int(get_method("sce").fn(taus.clone(), select_topk=0.5, trim="topk").count_nonzero()) <= 2
