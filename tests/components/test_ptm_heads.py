"""ClassStatistics and the closed-form heads against independent numpy / sklearn computations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.discriminant_analysis import LinearDiscriminantAnalysis

from clpeft.components.heads.class_statistics import ClassStatistics
from clpeft.components.heads.classifiers import CosineHead, LDAHead, PrototypeHead, RidgeHead, ridge_by_holdout

D, C, N = 6, 4, 300


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    y = rng.integers(0, C, N)
    x = rng.normal(size=(N, D)) * rng.uniform(0.5, 3, D) + 2.0 * rng.normal(size=(C, D))[y]
    return x.astype(np.float32).astype(np.float64), y  # float32-exact, so float32 features are the same data


def _fed(x, y, covariance, seed=1) -> ClassStatistics:
    """Statistics fed in random batch sizes, in a random order, partly through ``merge``."""
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(y))
    cuts = np.sort(rng.choice(np.arange(1, len(y)), size=12, replace=False))
    stats, other = ClassStatistics(D, covariance=covariance), ClassStatistics(D, covariance=covariance)
    for i, part in enumerate(np.split(order, cuts)):
        target = stats if i % 3 else other
        target.update(torch.tensor(x[part], dtype=torch.float32), torch.tensor(y[part]))
    stats.merge(other)
    return stats


def _class_means(x, y):
    return np.stack([x[y == c].mean(0) for c in range(C)])


@pytest.mark.parametrize("covariance", ["none", "shared", "per_class"])
def test_class_statistics_equal_numpy_for_any_batch_split(data, covariance):
    x, y = data
    stats = _fed(x, y, covariance)
    np.testing.assert_array_equal(stats.counts.numpy(), np.bincount(y, minlength=C))
    np.testing.assert_allclose(stats.means().numpy(), _class_means(x, y), rtol=0, atol=1e-12)
    np.testing.assert_allclose(stats.class_sums().numpy(), np.stack([x[y == c].sum(0) for c in range(C)]), atol=1e-10)
    if covariance == "none":
        return
    within = sum((x[y == c] - x[y == c].mean(0)).T @ (x[y == c] - x[y == c].mean(0)) for c in range(C))
    np.testing.assert_allclose(stats.shared_covariance().numpy(), within / (N - C), atol=1e-11)
    np.testing.assert_allclose(stats.shared_covariance(unbiased=False).numpy(), within / N, atol=1e-11)
    np.testing.assert_allclose(stats.total_covariance().numpy(), np.cov(x.T), atol=1e-11)
    np.testing.assert_allclose(stats.gram().numpy(), x.T @ x, rtol=1e-12, atol=1e-9)
    if covariance == "per_class":
        for c in range(C):
            np.testing.assert_allclose(stats.covariance(c).numpy(), np.cov(x[y == c].T), atol=1e-11)
    else:
        with pytest.raises(RuntimeError, match="per_class"):
            stats.covariance(0)


def test_class_statistics_round_trip_into_a_fresh_instance_and_keep_accumulating(data):
    x, y = data
    half = N // 2
    stats = _fed(x[:half], y[:half], "per_class")
    fresh = ClassStatistics(D, covariance="per_class")  # 0 classes: loading resizes
    fresh.load_state_dict(stats.state_dict())
    for s in (stats, fresh):
        s.update(torch.tensor(x[half:]), torch.tensor(y[half:]))
    for name, value in stats.state_dict().items():
        assert torch.equal(fresh.state_dict()[name], value), name
    np.testing.assert_allclose(fresh.covariance(1).numpy(), np.cov(x[y == 1].T), atol=1e-11)


def test_cosine_head_logits_and_growth(data):
    x, _ = data
    head = CosineHead(D, 3, scale=4.0)
    old = head.weight.detach().clone()
    head.grow_to(C)
    assert torch.equal(head.weight[:3].detach(), old) and head.n_classes == C
    w = head.weight.detach().double().numpy()
    expected = 4.0 * (x / np.linalg.norm(x, axis=1, keepdims=True)) @ (w / np.linalg.norm(w, axis=1, keepdims=True)).T
    np.testing.assert_allclose(head(torch.tensor(x, dtype=torch.float32)).detach().numpy(), expected, rtol=1e-5, atol=1e-5)
    assert [n for n, p in head.named_parameters()] == ["weight", "scale"]
    fixed = CosineHead(D, C, scale=4.0, learn_scale=False)
    assert [n for n, _ in fixed.named_parameters()] == ["weight"]


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_prototype_head_is_nearest_class_mean(data, metric):
    x, y = data
    head = PrototypeHead(D, metric=metric, scale=2.0)
    head.fit(_fed(x, y, "none"))
    mu = _class_means(x, y)
    if metric == "cosine":
        expected = 2.0 * (x / np.linalg.norm(x, axis=1, keepdims=True)) @ (mu / np.linalg.norm(mu, axis=1, keepdims=True)).T
    else:
        expected = -2.0 * ((x[:, None, :] - mu[None]) ** 2).sum(-1)
    np.testing.assert_allclose(head(torch.tensor(x)).numpy(), expected, rtol=1e-10, atol=1e-9)


def test_lda_head_equals_the_closed_form(data):
    x, y = data
    stats = _fed(x, y, "shared")
    head = LDAHead(D, shrinkage=0.3, ridge=0.5)
    head.fit(stats.means(), stats.total_covariance())
    mu, cov = _class_means(x, y), np.cov(x.T)
    reg = 0.7 * cov + (0.3 * np.trace(cov) / D + 0.5) * np.eye(D)
    inv = np.linalg.inv(reg)
    expected = x @ inv @ mu.T - 0.5 * np.einsum("cd,de,ce->c", mu, inv, mu)
    np.testing.assert_allclose(head(torch.tensor(x)).numpy(), expected, rtol=1e-9, atol=1e-8)


@pytest.mark.parametrize("shrinkage", [0.0, 0.2, 0.9])
def test_lda_head_matches_sklearn_lsqr_up_to_the_log_prior(data, shrinkage):
    x, y = data
    stats = _fed(x, y, "shared")
    head = LDAHead(D, shrinkage=shrinkage)
    head.fit(stats.means(), stats.shared_covariance(unbiased=False))
    sk = LinearDiscriminantAnalysis(solver="lsqr", shrinkage=shrinkage).fit(x, y)
    expected = sk.decision_function(x) - np.log(sk.priors_)
    np.testing.assert_allclose(head(torch.tensor(x)).numpy(), expected, rtol=1e-8, atol=1e-7)


def test_ridge_head_and_holdout_choice_equal_numpy(data):
    x, y = data
    fit, held = np.arange(N) < 240, np.arange(N) >= 240
    onehot = np.eye(C)[y]
    stats_fit, stats_held = (_fed(x[m], y[m], "shared") for m in (fit, held))
    candidates = [10.0**k for k in range(-4, 5)]
    ridge, losses = ridge_by_holdout(
        stats_fit.gram(), stats_fit.class_sums(), stats_held.gram(), stats_held.class_sums(), float(held.sum()), candidates
    )
    expected = []
    for lam in candidates:  # the authors' loop: solve on the fit split, MSE on the held-out split
        w = np.linalg.solve(x[fit].T @ x[fit] + lam * np.eye(D), x[fit].T @ onehot[fit])
        expected.append(((x[held] @ w - onehot[held]) ** 2).mean())
    np.testing.assert_allclose(losses, expected, rtol=1e-8)
    assert ridge == candidates[int(np.argmin(expected))]

    head = RidgeHead(D)
    head.fit(stats_fit.gram(), stats_fit.class_sums(), ridge)
    w = np.linalg.solve(x[fit].T @ x[fit] + ridge * np.eye(D), x[fit].T @ onehot[fit])
    np.testing.assert_allclose(head(torch.tensor(x)).numpy(), x @ w, rtol=1e-9, atol=1e-9)


def test_ridge_head_cosine_read_out_is_pilots_cosine_linear(data):
    """``metric='cosine'``: LAMDA-PILOT's RanPAC puts ``W`` into a ``CosineLinear``: logits
    ``cos(x, w_c)``; ``linear`` is eq. 4's ``x^T w_c``. Same weights either way."""
    x, y = data
    stats = _fed(x, y, "shared")
    linear, cosine = RidgeHead(D), RidgeHead(D, metric="cosine")
    for head in (linear, cosine):
        head.fit(stats.gram(), stats.class_sums(), 1.0)
    assert torch.equal(linear.weight, cosine.weight)
    w = linear.weight.numpy()
    expected = (x / np.linalg.norm(x, axis=1, keepdims=True)) @ (w / np.linalg.norm(w, axis=1, keepdims=True)).T
    np.testing.assert_allclose(cosine(torch.tensor(x)).numpy(), expected, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(linear(torch.tensor(x)).numpy(), x @ w.T, rtol=1e-12, atol=1e-12)


def test_statistics_and_closed_form_heads_under_bf16_autocast_equal_float32(data):
    """Fed and fitted under a bf16 autocast (the engine's ``train.amp`` on a GPU), the statistics
    stay float64 and equal, and the closed-form heads' weights and float32 logits are the same:
    accumulation and solves are float64, which autocast never casts, and the heads' forward
    turns autocast off as well. Mutation checked: accumulating ``ClassStatistics.update`` in
    float32 fails it (its scatter matmul then runs in bf16)."""
    x, y = data
    features = torch.tensor(x, dtype=torch.float32)
    runs = []
    for autocast in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            stats = {mode: _fed(x, y, mode) for mode in ("none", "shared", "per_class")}
            heads = [PrototypeHead(D), LDAHead(D, ridge=1.0), RidgeHead(D), RidgeHead(D, metric="cosine")]
            heads[0].fit(stats["none"])
            heads[1].fit(stats["shared"].means(), stats["shared"].total_covariance())
            ridge, _ = ridge_by_holdout(
                stats["shared"].gram(),
                stats["shared"].class_sums(),
                stats["per_class"].gram(),
                stats["per_class"].class_sums(),
                float(N),
                [0.1, 1.0, 10.0],
            )
            for head in heads[2:]:
                head.fit(stats["shared"].gram(), stats["shared"].class_sums(), ridge)
            logits = [head(features) for head in heads]
        runs.append(([s.state_dict() for s in stats.values()] + [h.state_dict() for h in heads], logits))
    (states, logits), (states_bf16, logits_bf16) = runs
    for state, state_bf16 in zip(states, states_bf16):
        for key, value in state.items():
            assert state_bf16[key].dtype == value.dtype == torch.float64
            torch.testing.assert_close(state_bf16[key], value, rtol=1e-12, atol=1e-12)
    for ours, theirs in zip(logits_bf16, logits):
        assert ours.dtype == torch.float32
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


@pytest.mark.parametrize(
    "make",
    [
        lambda: CosineHead(D, C),
        lambda: PrototypeHead(D, C),
        lambda: LDAHead(D, C, ridge=1.0),
        lambda: RidgeHead(D, C),
    ],
)
def test_heads_round_trip_into_a_fresh_instance(data, make):
    x, y = data
    head = make()
    if isinstance(head, PrototypeHead):
        head.fit(_fed(x, y, "none"))
    elif isinstance(head, LDAHead):
        stats = _fed(x, y, "shared")
        head.fit(stats.means(), stats.total_covariance())
    elif isinstance(head, RidgeHead):
        stats = _fed(x, y, "shared")
        head.fit(stats.gram(), stats.class_sums(), 1.0)
    fresh = type(head)(D)  # zero classes; loading grows it
    fresh.load_state_dict(head.state_dict())
    features = torch.tensor(x, dtype=torch.float32)
    assert fresh.n_classes == C
    assert torch.equal(fresh(features), head(features))
