"""ClassifierAlignment (SLCA) against numpy: stored statistics, sampling, logit normalisation, alignment;
AlignedHead against ClassifierAlignment itself."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from clpeft.components.heads.alignment import AlignedHead, ClassifierAlignment
from clpeft.components.heads.classifiers import LinearHead

D = 5


def _gaussian_classes(n_classes: int, n: int = 400, seed: int = 0):
    """Features of ``n_classes`` classes, each a correlated Gaussian with its own mean and covariance."""
    rng = np.random.default_rng(seed)
    xs, ys = [], []
    for c in range(n_classes):
        mix = rng.normal(size=(D, D)) * rng.uniform(0.3, 2.0, D)
        xs.append(rng.normal(size=(n, D)) @ mix + 4.0 * rng.normal(size=D))
        ys.append(np.full(n, c))
    return np.concatenate(xs).astype(np.float32).astype(np.float64), np.concatenate(ys)


def _fed(x, y, tasks: list[list[int]], **kw) -> ClassifierAlignment:
    """An alignment fed task by task (in batches of 64), as SLCA does after each experience."""
    ca = ClassifierAlignment(D, **kw)
    for t, classes in enumerate(tasks):
        idx = np.flatnonzero(np.isin(y, classes))
        for part in np.array_split(idx, max(len(idx) // 64, 1)):
            ca.update(torch.tensor(x[part], dtype=torch.float32), torch.tensor(y[part]), t)
    return ca


def test_statistics_are_numpy_means_and_covariances_plus_the_ridge():
    x, y = _gaussian_classes(3)
    ca = _fed(x, y, [[0, 1], [2]], ridge=1e-4)
    np.testing.assert_array_equal(ca.task_of_class.numpy(), [0, 0, 1])
    covs = ca.sampling_covariances().numpy()
    for c in range(3):
        np.testing.assert_allclose(ca.stats.means()[c].numpy(), x[y == c].mean(0), atol=1e-10)
        np.testing.assert_allclose(covs[c], np.cov(x[y == c].T) + 1e-4 * np.eye(D), atol=1e-10)


def test_sampled_features_have_the_stored_mean_and_covariance():
    x, y = _gaussian_classes(2)
    ca = _fed(x, y, [[0, 1]], ridge=0.0)
    n = 40_000
    samples, labels = ca.sample(n, torch.Generator().manual_seed(0))
    samples, labels = samples.double().numpy(), labels.numpy()
    np.testing.assert_array_equal(np.bincount(labels), [n, n])
    for c in range(2):
        mean, cov = ca.stats.means()[c].numpy(), ca.stats.covariance(c).numpy()
        s = samples[labels == c]
        # |mean error| < 5 standard errors per coordinate; covariance entries within 5 standard
        # errors (var(x_i x_j) = S_ii S_jj + S_ij^2 for a Gaussian)
        assert np.all(np.abs(s.mean(0) - mean) < 5 * np.sqrt(np.diag(cov) / n))
        tolerance = 5 * np.sqrt((np.outer(np.diag(cov), np.diag(cov)) + cov**2) / n)
        assert np.all(np.abs(np.cov(s.T) - cov) < tolerance)
    # the tolerance is tight enough to catch a sampler that ignores the correlations
    wrong = np.diag(np.diag(ca.stats.covariance(0).numpy()))
    assert np.any(np.abs(np.cov(samples[labels == 0].T) - wrong) > tolerance)


def test_sampling_is_reproducible_from_the_generator():
    x, y = _gaussian_classes(2)
    ca = _fed(x, y, [[0, 1]])
    first = ca.sample(8, torch.Generator().manual_seed(3))[0]
    assert torch.equal(first, ca.sample(8, torch.Generator().manual_seed(3))[0])
    assert not torch.equal(first, ca.sample(8, torch.Generator().manual_seed(4))[0])


def test_older_tasks_means_are_shrunk_as_in_the_official_code():
    x, y = _gaussian_classes(3)
    ca = _fed(x, y, [[0], [1], [2]], mean_shrink=0.1)
    means = np.stack([x[y == c].mean(0) for c in range(3)])
    expected = means * np.array([0.9 + 0.1 * (t + 1) / 3 for t in range(3)])[:, None]
    np.testing.assert_allclose(ca.sampling_means().numpy(), expected, atol=1e-10)
    assert _fed(x, y, [[0], [1], [2]], mean_shrink=0.0).sampling_means().numpy() == pytest.approx(means, abs=1e-10)


def test_logit_normalisation_divides_by_the_mean_task_norm_and_the_temperature():
    x, y = _gaussian_classes(5, n=10)
    ca = _fed(x, y, [[0, 1], [2, 3, 4]], temperature=0.1)
    z = np.random.default_rng(1).normal(size=(7, 5))
    norms = np.stack([np.linalg.norm(z[:, :2], axis=1) + 1e-7, np.linalg.norm(z[:, 2:], axis=1) + 1e-7], 1)
    expected = z / (norms.mean(1, keepdims=True) * 0.1)
    np.testing.assert_allclose(ca.normalised_logits(torch.tensor(z)).numpy(), expected, rtol=1e-12)
    assert torch.equal(_fed(x, y, [[0, 1], [2, 3, 4]], temperature=None).normalised_logits(torch.tensor(z)), torch.tensor(z))


def test_alignment_fixes_a_head_that_ignores_the_old_task():
    x, y = _gaussian_classes(4, n=300)
    ca = _fed(x, y, [[0, 1], [2, 3]], samples_per_class=64, epochs=20, lr=0.01, mean_shrink=0.0)
    torch.manual_seed(0)
    head = LinearHead(D, 4)
    with torch.no_grad():  # a head knowing nothing but a bias for the new task: everything is class 2
        head.weight.zero_()
        head.bias[:] = torch.tensor([0.0, 0.0, 1.0, 0.5])
    old = y < 2

    def accuracy(mask):
        return float((head(torch.tensor(x[mask], dtype=torch.float32)).argmax(1).numpy() == y[mask]).mean())

    assert accuracy(old) == 0.0 and accuracy(y >= 0) == 0.25
    losses = ca.align(head, torch.Generator().manual_seed(0))
    assert losses[-1] < losses[0]
    assert accuracy(old) > 0.85 and accuracy(y >= 0) > 0.8


def test_state_dict_round_trip_gives_the_same_samples():
    x, y = _gaussian_classes(3)
    ca = _fed(x, y, [[0], [1, 2]])
    fresh = ClassifierAlignment(D)
    fresh.load_state_dict(ca.state_dict())
    assert torch.equal(fresh.task_of_class, ca.task_of_class)
    a = ca.sample(16, torch.Generator().manual_seed(0))
    b = fresh.sample(16, torch.Generator().manual_seed(0))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_alignment_needs_every_class_seen():
    ca = ClassifierAlignment(D)
    ca.update(torch.randn(4, D), torch.tensor([0, 0, 2, 2]), 0)
    with pytest.raises(RuntimeError, match=r"classes \[1\]"):
        ca.sample(2)


# ---------------------------------------------------------------------- AlignedHead


def _batches(x, y, classes: list[int], size: int = 64):
    idx = np.flatnonzero(np.isin(y, classes))
    return [(torch.from_numpy(x[i]).float(), torch.from_numpy(y[i])) for i in np.array_split(idx, max(1, len(idx) // size))]


def test_aligned_head_is_slcas_backup_and_recall_of_a_trained_head():
    """After the first task nothing is aligned and the trained head predicts; after the second, the
    prediction comes from a copy of the trained head aligned exactly as ClassifierAlignment.align
    does with the seed drawn from the global generator; the trained head itself never changes."""
    x, y = _gaussian_classes(4)
    torch.manual_seed(0)
    trained = LinearHead(D, 2)
    wrapper = AlignedHead(D, samples_per_class=32, epochs=3)
    wrapper.update(trained, _batches(x, y, [0, 1]), task=0)
    probe = torch.from_numpy(x[::50]).float()
    assert wrapper.head.n_classes == 0 and torch.equal(wrapper(probe, trained), trained(probe))

    trained.grow_to(4)
    before = copy.deepcopy(trained.state_dict())
    reference = _fed(x, y, [[0, 1], [2, 3]], samples_per_class=32, epochs=3)
    torch.manual_seed(7)
    seed = int(torch.randint(2**62, (), dtype=torch.long))
    expected = copy.deepcopy(trained).requires_grad_(True)
    reference.align(expected, torch.Generator().manual_seed(seed))

    torch.manual_seed(7)
    wrapper.update(trained, _batches(x, y, [2, 3]), task=1)
    assert all(torch.equal(v, before[k]) for k, v in trained.state_dict().items())
    torch.testing.assert_close(wrapper.head.weight, expected.weight, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(wrapper.head.bias, expected.bias, rtol=1e-5, atol=1e-6)
    assert not wrapper.head.weight.requires_grad
    assert torch.equal(wrapper(probe, trained), wrapper.head(probe))
    trained.grow_to(6)  # a new experience's classes: the copy no longer covers the head
    assert torch.equal(wrapper(probe, trained), trained(probe))


def test_disabled_aligned_head_reads_no_data_and_predicts_with_the_trained_head():
    def unreadable():
        raise AssertionError("a disabled alignment must not compute features")
        yield

    trained = LinearHead(D, 4)
    wrapper = AlignedHead(D, enabled=False)
    for task in range(3):
        wrapper.update(trained, unreadable(), task)
    probe = torch.randn(7, D)
    assert torch.equal(wrapper(probe, trained), trained(probe))


def _sdc_numpy(means: np.ndarray, before: np.ndarray, after: np.ndarray, sigma: float) -> np.ndarray:
    """Yu et al. 2020, eq. 8-9 written out: Gaussian weights of each sample around each old mean."""
    drift = np.zeros_like(means)
    for c, mu in enumerate(means):
        w = np.array([np.exp(-np.sum((z - mu) ** 2) / (2 * sigma**2)) for z in before])
        drift[c] = (w[:, None] * (after - before)).sum(0) / w.sum()
    return drift


def test_drift_compensation_moves_old_means_by_sdcs_weighted_displacement():
    x, y = _gaussian_classes(4)
    x = x / np.linalg.norm(x, axis=1).mean()  # unit-scale features, where exp() does not underflow in numpy
    torch.manual_seed(0)
    trained = LinearHead(D, 2)
    wrapper = AlignedHead(D, drift_compensation=True, drift_sigma=0.5, samples_per_class=16, epochs=1)
    wrapper.track(_batches(x, y, [0, 1]))  # nothing stored yet: nothing to compensate
    wrapper.update(trained, _batches(x, y, [0, 1]), task=0)
    old_means = wrapper.alignment.stats.means().numpy().copy()

    rng = np.random.default_rng(1)
    new = _batches(x, y, [2, 3])
    before = np.concatenate([f.double().numpy() for f, _ in new])
    moved = [(f + torch.from_numpy(rng.normal(0, 0.2, f.shape)).float(), labels) for f, labels in new]
    after = np.concatenate([f.double().numpy() for f, _ in moved])
    wrapper.track(new)
    trained.grow_to(4)
    wrapper.update(trained, moved, task=1)

    sigma = 0.5 * np.linalg.norm(before, axis=1).mean()
    expected = old_means + _sdc_numpy(old_means, before, after, sigma)
    means = wrapper.alignment.stats.means().numpy()
    np.testing.assert_allclose(means[:2], expected, rtol=1e-9, atol=1e-9)
    new_means = [after[np.concatenate([lab.numpy() for _, lab in moved]) == c].mean(0) for c in (2, 3)]
    np.testing.assert_allclose(means[2:], new_means, rtol=1e-6, atol=1e-6)  # new classes: their own features


def test_a_translation_of_every_feature_moves_every_old_mean_by_it():
    """Hand-worked: z^t = z^{t-1} + v for every sample gives Delta_c = v whatever the weights."""
    x, y = _gaussian_classes(4)
    v = torch.tensor([1.0, -2.0, 0.5, 0.0, 3.0])
    wrapper = AlignedHead(D, drift_compensation=True, samples_per_class=8, epochs=1)
    trained = LinearHead(D, 2)
    wrapper.update(trained, _batches(x, y, [0, 1]), task=0)
    old_means = wrapper.alignment.stats.means().clone()
    new = _batches(x, y, [2, 3])
    wrapper.track(new)
    trained.grow_to(4)
    wrapper.update(trained, [(f + v, labels) for f, labels in new], task=1)
    # z + v is rounded to float32 (features of magnitude ~10: ulp ~1e-6)
    torch.testing.assert_close(wrapper.alignment.stats.means()[:2], old_means + v.double(), rtol=0, atol=1e-5)


def test_drift_compensation_needs_the_same_samples_before_and_after():
    x, y = _gaussian_classes(4)
    wrapper = AlignedHead(D, drift_compensation=True, samples_per_class=8, epochs=1)
    trained = LinearHead(D, 2)
    wrapper.update(trained, _batches(x, y, [0, 1]), task=0)
    new = _batches(x, y, [2, 3])
    wrapper.track(new)
    trained.grow_to(4)
    with pytest.raises(RuntimeError, match="same batches"):
        wrapper.update(trained, new[:-1], task=1)


def test_statistics_and_alignment_under_bf16_autocast_equal_those_without():
    """Called under a bf16 autocast (the engine's ``train.amp`` on a GPU), the stored Gaussians
    stay float64 and equal, and the alignment trains the head in float32 exactly as without it.
    Mutation checked: dropping ``torch.autocast(..., enabled=False)`` from ``align`` fails it
    (the head's logits become bf16)."""
    x, y = _gaussian_classes(4, n=200)
    runs = []
    for autocast in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            ca = _fed(x, y, [[0, 1], [2, 3]], samples_per_class=32, epochs=3)
            torch.manual_seed(0)
            head = LinearHead(D, 4)
            losses = ca.align(head, torch.Generator().manual_seed(0))
        runs.append((ca.state_dict(), head.state_dict(), losses))
    (stats, head, losses), (stats_bf16, head_bf16, losses_bf16) = runs
    for key, value in stats.items():
        assert stats_bf16[key].dtype == value.dtype
        torch.testing.assert_close(stats_bf16[key], value, rtol=1e-12, atol=1e-12)
    for key, value in head.items():
        assert head_bf16[key].dtype == torch.float32
        torch.testing.assert_close(head_bf16[key], value, rtol=1e-6, atol=1e-7)
    assert losses_bf16 == pytest.approx(losses, rel=1e-6)
