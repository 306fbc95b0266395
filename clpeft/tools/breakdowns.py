"""Scenario-specific views of one run's ``metrics.json``, derived from what it stores.

* every stream: accuracy on the **old** experiences (``j < i``) and on the **new** one (``j = i``)
  after each step ``i``, from the accuracy matrix and the test sizes (:func:`old_new_accuracy`);
* the end of a run: per-class accuracy from ``final_confusion`` (:func:`per_class_accuracy`);
* few-shot class-incremental streams: accuracy per session, base/novel accuracy and their
  harmonic mean (:func:`few_shot_sessions`, i.e. :func:`clpeft.metrics.few_shot_summary`);
* test-time adaptation: the error on each named domain (:func:`domain_errors`).

The experiences of a class-incremental stream hold disjoint classes, so ``R[i, j]`` is the
accuracy on the class group of experience ``j`` and these are class-group accuracies.
"""

from __future__ import annotations

import numpy as np

from clpeft.metrics import few_shot_summary

FEW_SHOT = "few_shot_class_incremental"
TTA = "test_time_adaptation"


def scenario_kind(run: dict, config: dict | None = None) -> str:
    """``test_time_adaptation`` (a run with ``domains``), ``few_shot_class_incremental`` (session
    metrics, or that scenario in ``config``), else ``incremental`` (a ``T x T`` accuracy matrix)."""
    if "domains" in run:
        return TTA
    name = ((config or {}).get("scenario") or {}).get("name")
    if "session_acc" in run.get("metrics", {}) or name == FEW_SHOT:
        return FEW_SHOT
    return "incremental"


def old_new_accuracy(acc_matrix, test_sizes) -> tuple[list[float | None], list[float]]:
    """``(old, new)`` after each step ``i``.

    ``old[i] = sum_{j<i} n_j R[i, j] / sum_{j<i} n_j`` (None at ``i = 0``: nothing is old yet) and
    ``new[i] = R[i, i]``, with ``n_j`` the size of experience ``j``'s test set.
    """
    R = np.asarray(acc_matrix, dtype=float)
    n = np.asarray(test_sizes, dtype=float)
    old = [None if i == 0 else float(np.dot(R[i, :i], n[:i]) / n[:i].sum()) for i in range(R.shape[0])]
    return old, [float(R[i, i]) for i in range(R.shape[0])]


def per_class_accuracy(confusion) -> list[float | None]:
    """``C[k, k] / sum_l C[k, l]`` for each true class ``k`` of a count matrix (None: no test sample)."""
    C = np.asarray(confusion, dtype=float)
    totals = C.sum(axis=1)
    return [float(C[k, k] / totals[k]) if totals[k] else None for k in range(len(C))]


def few_shot_sessions(run: dict) -> dict:
    """Per session ``i``: ``session_acc`` (all seen classes), and from session 1 on ``base_acc``
    (the classes of session 0, ``R[i, 0]``), ``novel_acc`` (the classes added in sessions
    ``1..i``, weighted by their test sizes) and ``harmonic_mean = 2 b n / (b + n)``.

    Computed from the accuracy matrix by :func:`clpeft.metrics.few_shot_summary`, as in Peng et
    al., "Few-Shot Class-Incremental Learning from an Open-Set Perspective" (ALICE), ECCV 2022,
    https://arxiv.org/abs/2207.09963; files written before the engine stored them read the same.
    The lists of base/novel/harmonic get a leading None for session 0, so every list has ``T``
    entries.
    """
    s = few_shot_summary(run["acc_matrix"], run["test_sizes"])
    return {"session_acc": s["session_acc"], **{k: [None, *s[k]] for k in ("base_acc", "novel_acc", "harmonic_mean")}}


def domain_errors(run: dict) -> tuple[list[str], list[float]]:
    """A test-time-adaptation run's domains (corruption@severity) and its online error on each."""
    return list(run["domains"]), list(run["metrics"]["error_per_domain"])


def adaptation(config: dict) -> str:
    """``reset`` when every domain starts from the source model (``scenario.reset_each_domain``), else ``continual``."""
    return "reset" if ((config or {}).get("scenario") or {}).get("reset_each_domain") else "continual"
