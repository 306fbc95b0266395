"""Continual-learning metrics computed from the accuracy matrix (pure numpy).

``R[i, j]`` is the accuracy on experience ``j``'s test data after training on experience
``i`` (``T x T``, every entry filled, ``j > i`` included). Accuracies are fractions in [0, 1].

References:
    * Lopez-Paz & Ranzato, "Gradient Episodic Memory for Continual Learning", NeurIPS 2017
      (ACC, BWT, FWT), https://arxiv.org/abs/1706.08840
    * Chaudhry et al., "Riemannian Walk for Incremental Learning", ECCV 2018 (forgetting),
      https://arxiv.org/abs/1801.10112
    * Rebuffi et al., "iCaRL: Incremental Classifier and Representation Learning", CVPR 2017
      (average incremental accuracy), https://arxiv.org/abs/1611.07725
    * Tao et al., "Few-Shot Class-Incremental Learning", CVPR 2020 (accuracy per session),
      https://arxiv.org/abs/2004.10956; Peng et al., "Few-Shot Class-Incremental Learning from an
      Open-Set Perspective", ECCV 2022 (base/novel accuracy and their harmonic mean),
      https://arxiv.org/abs/2207.09963
    * Wang et al., "Tent: Fully Test-Time Adaptation by Entropy Minimization", ICLR 2021 (error
      per corruption and its mean), https://arxiv.org/abs/2006.10726
    * Koh et al., "Online Continual Learning on Class Incremental Blurry Task Configuration with
      Anytime Inference", ICLR 2022 (anytime accuracy and its area under the curve, ``A_auc``),
      https://arxiv.org/abs/2110.10031

Few-shot class-incremental runs add :func:`few_shot_summary` to :func:`summarize`;
test-time-adaptation runs report :func:`tta_summary` instead (their "matrix" is one row of
online accuracies, not ``T x T``). Online streams add :func:`anytime_summary`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = [
    "summarize",
    "acc_final",
    "acc_seen",
    "backward_transfer",
    "forgetting",
    "forward_transfer",
    "few_shot_summary",
    "tta_summary",
    "anytime_summary",
    "area_under_accuracy",
    "scalar_metric_names",
    "transfer_is_measurable",
]


def _as_matrix(acc_matrix) -> np.ndarray:
    R = np.asarray(acc_matrix, dtype=np.float64)
    if R.ndim != 2 or R.shape[0] != R.shape[1] or R.shape[0] == 0:
        raise ValueError(f"acc_matrix must be a non-empty square T x T matrix, got shape {R.shape}")
    if not np.all(np.isfinite(R)):
        bad = [tuple(int(v) for v in ij) for ij in np.argwhere(~np.isfinite(R))]
        raise ValueError(f"acc_matrix has non-finite entries at {bad[:5]}; every R[i, j] must be filled")
    if R.min() < 0.0 or R.max() > 1.0:
        raise ValueError("acc_matrix entries must be fractions in [0, 1], not percentages")
    return R


def _as_vector(values, T: int, name: str, *, positive: bool = False, fraction: bool = False) -> np.ndarray:
    v = np.asarray(values, dtype=np.float64)
    if v.shape != (T,):
        raise ValueError(f"{name} must have one entry per experience ({T}), got shape {v.shape}")
    if not np.all(np.isfinite(v)):
        raise ValueError(f"{name} has non-finite entries")
    if positive and np.any(v <= 0):
        raise ValueError(f"{name} entries must be positive")
    if fraction and (v.min() < 0.0 or v.max() > 1.0):
        raise ValueError(f"{name} entries must be fractions in [0, 1], not percentages")
    return v


def acc_final(R: np.ndarray) -> float:
    """Average accuracy after the last experience, ``mean_j R[T-1, j]`` (GEM's ACC)."""
    return float(R[-1].mean())


def acc_seen(R: np.ndarray, test_sizes: np.ndarray | None = None) -> list[float]:
    """Accuracy on the experiences seen so far, after each step (iCaRL).

    ``acc_seen[i] = sum_{j<=i} n_j R[i, j] / sum_{j<=i} n_j`` with ``n_j`` the test sizes
    (equal weights when ``test_sizes`` is None), i.e. the accuracy on the pooled test data of
    experiences ``0..i``.
    """
    T = R.shape[0]
    n = np.ones(T) if test_sizes is None else test_sizes
    return [float(np.dot(R[i, : i + 1], n[: i + 1]) / n[: i + 1].sum()) for i in range(T)]


def backward_transfer(R: np.ndarray) -> float | None:
    """GEM's BWT: ``1/(T-1) * sum_{j<T-1} (R[T-1, j] - R[j, j])`` (negative = forgetting).

    ``None`` (n/a) with one experience: there is nothing earlier to transfer to.
    """
    T = R.shape[0]
    if T < 2:
        return None
    return float(np.mean(R[-1, :-1] - np.diag(R)[:-1]))


def forgetting(R: np.ndarray) -> float | None:
    """Average forgetting (Chaudhry et al., 2018, eq. 9-10).

    ``1/(T-1) * sum_{j<T-1} (max_{l<T-1} R[l, j] - R[T-1, j])``. The maximum runs over every
    earlier step ``l``, including those before ``j`` was trained, exactly as DESIGN.md defines it.
    ``None`` (n/a) with one experience.
    """
    T = R.shape[0]
    if T < 2:
        return None
    best = R[:-1, :-1].max(axis=0)
    return float(np.mean(best - R[-1, :-1]))


def forward_transfer(R: np.ndarray, baseline: np.ndarray) -> float | None:
    """GEM's FWT: ``1/(T-1) * sum_{j>=1} (R[j-1, j] - b_j)``, ``b`` = accuracy before training.

    ``None`` (n/a) with one experience. It measures transfer only when an experience's classes
    could be predicted before it was trained (a domain-incremental stream): in a class-incremental
    stream ``R[j-1, j]`` scores classes the model has no output for yet, so the engine reports
    ``fwt`` as n/a there (:func:`transfer_is_measurable`).
    """
    T = R.shape[0]
    if T < 2:
        return None
    idx = np.arange(1, T)
    return float(np.mean(R[idx - 1, idx] - baseline[1:]))


def summarize(
    acc_matrix: Sequence[Sequence[float]] | np.ndarray,
    test_sizes: Sequence[int] | None = None,
    baseline: Sequence[float] | None = None,
) -> dict:
    """All named metrics of a run from its accuracy matrix.

    Args:
        acc_matrix: ``R[i][j]``, accuracy on experience ``j`` after training on ``i`` (T x T).
        test_sizes: number of test samples of each experience; weights ``acc_seen``.
        baseline: accuracy of the model before any training on each experience; enables ``fwt``.

    Returns:
        ``acc_final``, ``acc_seen`` (list), ``acc_last``, ``acc_avg_incremental``, ``bwt``,
        ``forgetting`` and, when ``baseline`` is given, ``fwt``. With ``T = 1`` the transfer and
        forgetting terms are ``None`` (n/a: there is nothing to transfer to or forget).

    Raises:
        ValueError: a non-square matrix, a NaN/inf entry, values outside [0, 1] or vectors of
            the wrong length. Missing entries are refused, never skipped.
    """
    R = _as_matrix(acc_matrix)
    T = R.shape[0]
    sizes = None if test_sizes is None else _as_vector(test_sizes, T, "test_sizes", positive=True)
    seen = acc_seen(R, sizes)
    out = {
        "acc_final": acc_final(R),
        "acc_seen": seen,
        "acc_last": seen[-1],
        "acc_avg_incremental": float(np.mean(seen)),
        "bwt": backward_transfer(R),
        "forgetting": forgetting(R),
    }
    if baseline is not None:
        out["fwt"] = forward_transfer(R, _as_vector(baseline, T, "baseline", fraction=True))
    return out


def few_shot_summary(acc_matrix, test_sizes: Sequence[int]) -> dict:
    """Few-shot class-incremental metrics; session 0 is the base session.

    With ``R`` the accuracy matrix and ``n_j`` the test sizes (the test data of session ``j``
    holds exactly its new classes), after session ``i``:

    * ``session_acc[i] = sum_{j<=i} n_j R[i, j] / sum_{j<=i} n_j``: accuracy on the test data of
      every class seen so far (Tao et al., 2020; equals ``acc_seen``);
      ``session_acc_mean`` = its mean over sessions; ``performance_drop`` =
      ``session_acc[0] - session_acc[T-1]``;
    * ``base_acc[i] = R[i, 0]``, ``novel_acc[i] = sum_{1<=j<=i} n_j R[i, j] / sum_{1<=j<=i} n_j``
      and their harmonic mean ``harmonic_mean[i] = 2 b n / (b + n)`` (0 when both are 0;
      Peng et al., 2022), as lists over sessions ``1..T-1`` (session 0 has no novel class);
      the values after the last session are also given as ``base_acc_last``,
      ``novel_acc_last``, ``harmonic_mean_last`` (when ``T >= 2``).

    Raises:
        ValueError: as :func:`summarize` for a malformed matrix or test sizes.
    """
    R = _as_matrix(acc_matrix)
    T = R.shape[0]
    n = _as_vector(test_sizes, T, "test_sizes", positive=True)
    session = acc_seen(R, n)
    out: dict = {
        "session_acc": session,
        "session_acc_mean": float(np.mean(session)),
        "performance_drop": session[0] - session[-1],
    }
    base = [float(R[i, 0]) for i in range(1, T)]
    novel = [float(np.dot(R[i, 1 : i + 1], n[1 : i + 1]) / n[1 : i + 1].sum()) for i in range(1, T)]
    harmonic = [2 * b * v / (b + v) if b + v > 0 else 0.0 for b, v in zip(base, novel)]
    out.update(base_acc=base, novel_acc=novel, harmonic_mean=harmonic)
    if T >= 2:
        out.update(base_acc_last=base[-1], novel_acc_last=novel[-1], harmonic_mean_last=harmonic[-1])
    return out


def tta_summary(correct: Sequence[int], counts: Sequence[int]) -> dict:
    """Test-time-adaptation metrics from the online predictions on each domain.

    ``error_per_domain[d] = 1 - correct[d] / counts[d]`` (every prediction is made once, while
    the model adapts, before it sees the next batch); ``error_mean`` = their unweighted mean
    over domains, the number of corruption benchmarks (Wang et al., 2021);
    ``error_overall`` = the error over all test samples pooled.
    """
    c = np.asarray(correct, dtype=np.float64)
    n = np.asarray(counts, dtype=np.float64)
    if c.ndim != 1 or c.shape != n.shape or len(c) == 0:
        raise ValueError(f"correct and counts must be equal-length non-empty lists, got {c.shape} and {n.shape}")
    if np.any(n <= 0) or np.any(c < 0) or np.any(c > n):
        raise ValueError("every domain needs a positive count and 0 <= correct <= count")
    errors = 1.0 - c / n
    return {
        "error_per_domain": [float(e) for e in errors],
        "error_mean": float(errors.mean()),
        "error_overall": float(1.0 - c.sum() / n.sum()),
    }


def area_under_accuracy(samples: Sequence[int], accuracy: Sequence[float]) -> float | None:
    """``A_auc`` of Koh et al. 2022: ``sum_i f(n_i) (n_i - n_{i-1})`` normalised by ``n_K``.

    ``f(n_i)`` is the anytime accuracy measured after ``n_i`` stream samples (``n_0 = 0``). The
    paper writes ``A_auc = sum_i f(i dn) dn``; its code (naver-ai/i-Blurry ``main.py``) reports the
    mean of ``f`` over the points ``dn, 2 dn, ...``, which is that sum divided by ``K dn`` and is
    what this returns for evenly spaced points: a fraction in [0, 1]. None without points.
    """
    n = np.asarray(samples, dtype=np.float64)
    f = np.asarray(accuracy, dtype=np.float64)
    if n.shape != f.shape or n.ndim != 1:
        raise ValueError(f"samples and accuracy must be equal-length lists, got {n.shape} and {f.shape}")
    if len(n) == 0:
        return None
    widths = np.diff(n, prepend=0.0)
    if np.any(widths <= 0):
        raise ValueError(f"sample counts must increase from above 0, got {list(samples)}")
    return float(np.sum(f * widths) / n[-1])


def anytime_summary(curve: Sequence[Sequence[float]], n_samples: int, train_s: float) -> dict:
    """Online metrics from the anytime-accuracy curve ``[[samples seen, accuracy], ...]``.

    Keys: ``a_auc`` (:func:`area_under_accuracy`), ``acc_anytime_last`` (the curve's last point),
    ``anytime_curve`` (the points), ``stream_samples`` and ``samples_per_s`` (stream samples per
    second of training, evaluation excluded; None when no time was measured).
    """
    samples = [int(p[0]) for p in curve]
    accuracy = [float(p[1]) for p in curve]
    return {
        "a_auc": area_under_accuracy(samples, accuracy),
        "acc_anytime_last": accuracy[-1] if accuracy else None,
        "anytime_curve": [[n, a] for n, a in zip(samples, accuracy)],
        "stream_samples": int(n_samples),
        "samples_per_s": n_samples / train_s if train_s > 0 else None,
    }


def scalar_metric_names(kind: str, baseline: bool = True, online: bool = False) -> list[str]:
    """The scalar metrics a run of scenario ``kind`` reports (what ``sweep --metric`` may rank by);
    ``online``: a run of an online stream, which adds :func:`anytime_summary`'s.

    Read off the summaries themselves on a two-step example, so the list cannot drift from them.
    """
    if kind == "test_time_adaptation":
        summary = tta_summary([1, 1], [2, 2])
    else:
        R, sizes = [[1.0, 0.0], [0.5, 1.0]], [1, 1]
        classes = [[0, 1], [0, 1]] if kind == "domain_incremental" else [[0], [1]]
        summary = summarize(R, sizes, [0.0, 0.0] if baseline and transfer_is_measurable(classes) else None)
        if kind == "few_shot_class_incremental":
            summary.update(few_shot_summary(R, sizes))
        if online:
            summary.update(anytime_summary([[1, 1.0]], 1, 1.0))
    return [name for name, value in summary.items() if not isinstance(value, list)]


def transfer_is_measurable(classes_per_experience: Sequence[Sequence[int]]) -> bool:
    """Whether FWT can mean transfer: every experience after the first shares a class with those before.

    Before training experience ``j`` a class-incremental model has no output for ``j``'s new
    classes, so ``R[j-1, j] - b_j`` only measures how the untrained baseline guessed.
    """
    seen: set[int] = set()
    for j, classes in enumerate(classes_per_experience):
        if j and seen.isdisjoint(classes):
            return False
        seen.update(classes)
    return True
