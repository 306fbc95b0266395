"""Tests for ``clpeft.metrics.summarize`` (DESIGN.md, "Metrics").

Every expected number here comes from an independent computation: hand arithmetic written out
in comments, a deliberately naive loop implementation (``_reference``), or Avalanche 0.6.0's own
metric plug-ins on a real (tiny) training run.

Notation: ``R[i, j]`` = accuracy on experience ``j``'s test data after training on experience
``i``; ``n_j`` = test size of experience ``j``; ``b_j`` = accuracy before any training.
"""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from clpeft.metrics import summarize

KEYS = {"acc_final", "acc_seen", "acc_last", "acc_avg_incremental", "bwt", "forgetting"}


# --------------------------------------------------------------------------------------------
# 1. Hand-worked 3 x 3 example
# --------------------------------------------------------------------------------------------

# Column 0 is non-monotone (0.80 -> 0.90 -> 0.60), so Chaudhry's forgetting (max over earlier
# rows) differs from -BWT (which uses the diagonal R[j, j]); the test sizes are unequal, so the
# sample-weighted acc_seen differs from the plain mean.
R_HAND = [
    [0.80, 0.10, 0.05],
    [0.90, 0.70, 0.20],
    [0.60, 0.50, 0.90],
]
SIZES_HAND = [100, 300, 200]
BASELINE_HAND = [0.10, 0.05, 0.10]


def test_hand_worked_3x3_weighted_with_baseline():
    out = summarize(R_HAND, test_sizes=SIZES_HAND, baseline=BASELINE_HAND)
    assert set(out) == KEYS | {"fwt"}

    # acc_final = mean_j R[2, j] = (0.60 + 0.50 + 0.90) / 3 = 2.00 / 3 = 0.666...
    assert out["acc_final"] == pytest.approx(2.0 / 3.0, abs=1e-12)

    # acc_seen[0] = R[0,0]                                         = 0.80
    # acc_seen[1] = (100*0.90 + 300*0.70) / (100+300) = (90+210)/400 = 300/400 = 0.75
    #               (unweighted mean would be (0.90+0.70)/2 = 0.80 -> weighting matters)
    # acc_seen[2] = (100*0.60 + 300*0.50 + 200*0.90) / 600 = (60+150+180)/600 = 390/600 = 0.65
    #               (unweighted mean would be 2.00/3 = 0.667)
    assert isinstance(out["acc_seen"], list)
    assert out["acc_seen"] == pytest.approx([0.80, 0.75, 0.65], abs=1e-12)

    # acc_last = acc_seen[2] = 0.65
    assert out["acc_last"] == pytest.approx(0.65, abs=1e-12)

    # acc_avg_incremental = (0.80 + 0.75 + 0.65) / 3 = 2.20 / 3 = 0.7333...
    assert out["acc_avg_incremental"] == pytest.approx(2.2 / 3.0, abs=1e-12)

    # bwt = 1/2 * [(R[2,0] - R[0,0]) + (R[2,1] - R[1,1])]
    #     = 1/2 * [(0.60 - 0.80) + (0.50 - 0.70)] = 1/2 * (-0.20 - 0.20) = -0.20
    assert out["bwt"] == pytest.approx(-0.20, abs=1e-12)

    # forgetting = 1/2 * [(max(R[0,0], R[1,0]) - R[2,0]) + (max(R[0,1], R[1,1]) - R[2,1])]
    #            = 1/2 * [(max(0.80, 0.90) - 0.60) + (max(0.10, 0.70) - 0.50)]
    #            = 1/2 * [(0.90 - 0.60) + (0.70 - 0.50)] = 1/2 * (0.30 + 0.20) = 0.25
    # which is NOT -bwt = 0.20: column 0 peaked at l = 1, after it was trained.
    assert out["forgetting"] == pytest.approx(0.25, abs=1e-12)
    assert out["forgetting"] != pytest.approx(-out["bwt"], abs=1e-6)

    # fwt = 1/2 * [(R[0,1] - b_1) + (R[1,2] - b_2)]
    #     = 1/2 * [(0.10 - 0.05) + (0.20 - 0.10)] = 1/2 * (0.05 + 0.10) = 0.075
    assert out["fwt"] == pytest.approx(0.075, abs=1e-12)


def test_hand_worked_3x3_unweighted_without_baseline():
    out = summarize(R_HAND)
    assert set(out) == KEYS  # no baseline -> no fwt key
    # acc_seen with equal weights: [0.80, (0.90+0.70)/2, (0.60+0.50+0.90)/3] = [0.80, 0.80, 0.666..]
    assert out["acc_seen"] == pytest.approx([0.80, 0.80, 2.0 / 3.0], abs=1e-12)
    # acc_last then equals acc_final = 2/3
    assert out["acc_last"] == pytest.approx(2.0 / 3.0, abs=1e-12)
    assert out["acc_final"] == pytest.approx(2.0 / 3.0, abs=1e-12)
    # acc_avg_incremental = (0.80 + 0.80 + 2/3) / 3 = (1.60 + 2/3) / 3 = (6.8/3) / 3
    #                     = 6.8/9 = 0.7555...
    assert out["acc_avg_incremental"] == pytest.approx(6.8 / 9.0, abs=1e-12)
    # bwt / forgetting do not depend on the weights
    assert out["bwt"] == pytest.approx(-0.20, abs=1e-12)
    assert out["forgetting"] == pytest.approx(0.25, abs=1e-12)


def test_forgetting_max_includes_rows_before_the_experience_was_trained():
    """DESIGN.md's max runs over every l < T-1, also l < j (before j was trained).

    R[0, 1] = 0.60 (zero-shot accuracy on experience 1) exceeds R[1, 1] = 0.40, so
    forgetting = 1/2 * [(max(0.9, 0.8) - 0.7) + (max(0.6, 0.4) - 0.3)] = 1/2 * (0.2 + 0.3) = 0.25,
    whereas a max restricted to l >= j would give 1/2 * (0.2 + 0.1) = 0.15.
    """
    R = [[0.9, 0.6, 0.0], [0.8, 0.4, 0.0], [0.7, 0.3, 0.5]]
    out = summarize(R)
    assert out["forgetting"] == pytest.approx(0.25, abs=1e-12)
    # bwt = 1/2 * [(0.7 - 0.9) + (0.3 - 0.4)] = -0.15
    assert out["bwt"] == pytest.approx(-0.15, abs=1e-12)


def test_outputs_are_plain_json_serialisable_floats_and_input_untouched():
    R = np.array(R_HAND)
    R_copy = R.copy()
    sizes = np.array(SIZES_HAND)
    out = summarize(R, test_sizes=sizes, baseline=np.array(BASELINE_HAND))
    assert np.array_equal(R, R_copy)
    for k, v in out.items():
        if k == "acc_seen":
            assert all(type(x) is float for x in v)
        else:
            assert type(v) is float, (k, type(v))
    assert json.loads(json.dumps(out)) == out
    # numpy input and nested-list input give the same answer
    assert summarize(R_HAND, SIZES_HAND, BASELINE_HAND) == out


# --------------------------------------------------------------------------------------------
# 2. Edge cases and refused inputs
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sizes", [None, [17]])
def test_single_experience(sizes):
    out = summarize([[0.7]], test_sizes=sizes, baseline=[0.2])
    assert out["acc_last"] == pytest.approx(0.7, abs=1e-12)
    assert out["acc_final"] == pytest.approx(0.7, abs=1e-12)
    assert out["acc_seen"] == pytest.approx([0.7], abs=1e-12)
    assert out["acc_avg_incremental"] == pytest.approx(0.7, abs=1e-12)
    # one experience: nothing to transfer to or forget, so n/a (None), never a 0 that reads as a result
    assert out["bwt"] is None and out["forgetting"] is None and out["fwt"] is None


def test_bounds_zero_and_one_are_accepted():
    out = summarize([[0.0, 1.0], [1.0, 0.0]], baseline=[0.0, 1.0])
    # bwt = R[1,0] - R[0,0] = 1 - 0 = 1; forgetting = R[0,0] - R[1,0] = -1; fwt = R[0,1] - b1 = 0
    assert out["bwt"] == pytest.approx(1.0, abs=1e-12)
    assert out["forgetting"] == pytest.approx(-1.0, abs=1e-12)
    assert out["fwt"] == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf"), None])
def test_non_finite_or_missing_entry_refused_naming_position(bad):
    R = [[0.5, 0.1, 0.2], [0.4, 0.6, bad], [0.3, 0.5, 0.7]]
    with pytest.raises(ValueError, match=r"[\[(]1,\s*2[\])]"):
        summarize(R)


def test_nan_position_is_row_column_not_flattened():
    R = np.full((3, 3), 0.5)
    R[2, 0] = np.nan
    with pytest.raises(ValueError, match=r"[\[(]2,\s*0[\])]"):
        summarize(R)


@pytest.mark.parametrize(
    "R",
    [
        [[0.5, 0.5, 0.5], [0.5, 0.5, 0.5]],  # 2 x 3
        [[0.5], [0.5]],  # 2 x 1
        [0.5, 0.5],  # 1-D
        [[[0.5]]],  # 3-D
        [],  # empty
        [[]],  # 1 x 0
        np.zeros((0, 0)),  # 0 x 0
        [[0.1, 0.2], [0.3]],  # ragged
    ],
    ids=["2x3", "2x1", "1d", "3d", "empty", "1x0", "0x0", "ragged"],
)
def test_malformed_matrix_refused(R):
    with pytest.raises(ValueError):
        summarize(R)


@pytest.mark.parametrize("value", [80.0, 1.0 + 1e-9, 100.0, -0.01])
def test_out_of_range_entries_refused(value):
    R = [[0.5, 0.1], [value, 0.6]]
    with pytest.raises(ValueError):
        summarize(R)


def test_percent_matrix_refused_with_hint():
    with pytest.raises(ValueError, match="(?i)percent|fraction|\\[0, 1\\]"):
        summarize([[80.0, 10.0], [70.0, 90.0]])


@pytest.mark.parametrize("sizes", [[10, 20], [10, 20, 30, 40], [[10, 20, 30]], 10])
def test_wrong_length_test_sizes_refused(sizes):
    with pytest.raises(ValueError, match="test_sizes"):
        summarize(R_HAND, test_sizes=sizes)


@pytest.mark.parametrize("baseline", [[0.1, 0.1], [0.1] * 4, 0.1])
def test_wrong_length_baseline_refused(baseline):
    with pytest.raises(ValueError, match="baseline"):
        summarize(R_HAND, baseline=baseline)


@pytest.mark.parametrize("sizes", [[0, 10, 10], [10, -5, 10], [10, 10, float("nan")]])
def test_non_positive_or_nan_test_sizes_refused(sizes):
    with pytest.raises(ValueError, match="test_sizes"):
        summarize(R_HAND, test_sizes=sizes)


def test_non_finite_baseline_refused():
    with pytest.raises(ValueError, match="baseline"):
        summarize(R_HAND, baseline=[0.1, float("nan"), 0.1])


@pytest.mark.parametrize("baseline", [[10.0, 5.0, 10.0], [0.1, -0.2, 0.1]])
def test_baseline_outside_unit_interval_refused(baseline):
    """The baseline is an accuracy too (DESIGN.md: "Accuracies are fractions in [0, 1]").

    A baseline given in percent, with R in fractions, would silently give a meaningless fwt
    (here fwt = 1/2 * [(0.10 - 5.0) + (0.20 - 10.0)] = -7.35), exactly the mistake that the
    matrix check exists to catch.
    """
    with pytest.raises(ValueError, match="baseline"):
        summarize(R_HAND, baseline=baseline)


# --------------------------------------------------------------------------------------------
# 3. Agreement with Avalanche 0.6.0 on a real, tiny class-incremental run
# --------------------------------------------------------------------------------------------

T_AVL = 3
_EXP = "Top1_Acc_Exp/eval_phase/test_stream/Task000/Exp{:03d}"
_EXP_FORGET = "ExperienceForgetting/eval_phase/test_stream/Task000/Exp{:03d}"
_EXP_BWT = "ExperienceBWT/eval_phase/test_stream/Task000/Exp{:03d}"
_STREAM_ACC = "Top1_Acc_Stream/eval_phase/test_stream/Task000"
_TRAINED_ACC = "Accuracy_On_Trained_Experiences/eval_phase/test_stream/Task000"
_STREAM_FORGET = "StreamForgetting/eval_phase/test_stream"
_STREAM_BWT = "StreamBWT/eval_phase/test_stream"
_STREAM_FWT = "StreamForwardTransfer/eval_phase/test_stream"


@pytest.fixture(scope="module")
def avalanche_run():
    """Train a tiny MLP with Avalanche's Replay on sklearn digits, 3 class-incremental experiences.

    Evaluation protocol (the one clpeft's engine uses): once before any training (-> baseline
    row), then after each training experience on the *full* test stream. Returns Avalanche's
    metric dicts per evaluation, plus an accuracy matrix measured independently of Avalanche (by
    running the model ourselves on the test samples of each experience's classes).
    """
    # record=True: Avalanche's @deprecated re-enables DeprecationWarning ("once") itself, so
    # ignoring is not enough; recording swallows them instead of cluttering the summary.
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("ignore")
        import torch
        from avalanche.benchmarks import nc_benchmark
        from avalanche.evaluation.metrics import (
            accuracy_metrics,
            bwt_metrics,
            forgetting_metrics,
            forward_transfer_metrics,
        )
        from avalanche.training.determinism.rng_manager import RNGManager
        from avalanche.training.plugins import EvaluationPlugin
        from avalanche.training.supervised import Replay
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
        from torch import nn
        from torch.utils.data import TensorDataset

        X, y = load_digits(return_X_y=True)
        X = (X / 16.0).astype(np.float32)
        Xtr, Xte, ytr, yte = train_test_split(X, y, test_size=0.4, random_state=0, stratify=y)

        class _Digits(TensorDataset):
            def __init__(self, X, y):
                super().__init__(torch.from_numpy(X), torch.from_numpy(y).long())
                self.targets = torch.from_numpy(y).long()

        RNGManager.set_random_seeds(0)
        torch.manual_seed(0)
        # 4 + 3 + 3 classes: unequal test sizes, so weighted and unweighted means differ.
        bm = nc_benchmark(
            _Digits(Xtr, ytr),
            _Digits(Xte, yte),
            n_experiences=T_AVL,
            task_labels=False,
            seed=0,
            per_exp_classes={0: 4},
        )
        model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
        evaluator = EvaluationPlugin(
            accuracy_metrics(experience=True, stream=True, trained_experience=True),
            forgetting_metrics(experience=True, stream=True),
            bwt_metrics(experience=True, stream=True),
            forward_transfer_metrics(experience=True, stream=True),
            loggers=[],
        )
        strategy = Replay(
            model=model,
            optimizer=torch.optim.SGD(model.parameters(), lr=0.2),
            criterion=nn.CrossEntropyLoss(),
            mem_size=100,
            train_mb_size=32,
            train_epochs=1,
            eval_mb_size=512,
            device="cpu",
            evaluator=evaluator,
            eval_every=0,  # StreamForwardTransfer asserts eval_every > -1; no periodic eval
        )

        classes = [list(exp.classes_in_this_experience) for exp in bm.train_stream]
        masks = [np.isin(yte, c) for c in classes]
        Xte_t = torch.from_numpy(Xte)

        def own_eval_row():
            strategy.model.eval()
            with torch.no_grad():
                pred = strategy.model(Xte_t).argmax(1).numpy()
            return [float((pred[m] == yte[m]).sum()) / int(m.sum()) for m in masks]

        evals, own_rows = [], []

        def avalanche_eval():
            evaluator.reset_last_metrics()  # each dict holds only this evaluation's values
            evals.append(dict(strategy.eval(bm.test_stream)))
            own_rows.append(own_eval_row())

        avalanche_eval()  # before training: FWT baseline
        for exp in bm.train_stream:
            strategy.train(exp, eval_streams=[])
            avalanche_eval()

    def exp_acc(d):
        return [d[_EXP.format(j)] for j in range(T_AVL)]

    return {
        "baseline": np.array(exp_acc(evals[0])),
        "R": np.array([exp_acc(d) for d in evals[1:]]),  # T x T, from Avalanche's Top1_Acc_Exp
        "baseline_own": np.array(own_rows[0]),
        "R_own": np.array(own_rows[1:]),  # T x T, measured by us
        "test_sizes": [len(exp.dataset) for exp in bm.test_stream],
        "test_sizes_own": [int(m.sum()) for m in masks],
        "after": evals[1:],  # Avalanche metrics after training experience i
    }


def test_avalanche_run_accuracy_matrix_is_what_we_measure(avalanche_run):
    run = avalanche_run
    assert run["R"].shape == (T_AVL, T_AVL)
    np.testing.assert_allclose(run["R"], run["R_own"], rtol=0, atol=1e-12)
    np.testing.assert_allclose(run["baseline"], run["baseline_own"], rtol=0, atol=1e-12)
    assert run["test_sizes"] == run["test_sizes_own"]
    # The comparison below is only meaningful if the run is not degenerate:
    assert len(set(run["test_sizes"])) > 1  # unequal sizes: weighting matters
    assert abs(summarize(run["R"])["bwt"]) > 0.01  # something was forgotten or gained
    assert np.diag(run["R"]).max() > 0.5  # it did learn


def test_avalanche_bwt_equals_clpeft_bwt(avalanche_run):
    """Avalanche ``StreamBWT`` == clpeft ``bwt`` (GEM), after every step.

    Avalanche (evaluation/metrics/forgetting_bwt.py): ``GenericStreamForgetting.after_eval_exp``
    stores ``initial[j]`` when ``train_exp_id == eval_exp_id`` (i.e. R[j, j], measured right after
    training j) and ``last[j]`` otherwise (``last`` is reset in ``before_eval``);
    ``Forgetting.result_key`` returns ``initial[k] - last[k]``; ``StreamBWT.exp_result`` negates it
    (``forgetting_to_bwt``), and the stream value is an unweighted ``Mean`` (``weight=1``) over the
    experiences that have both, i.e. j < i after step i. So after step i:
        StreamBWT_i = 1/i * sum_{j<i} (R[i, j] - R[j, j]) = clpeft bwt of R[:i+1, :i+1]
    After step 0 Avalanche reports 0.0 (``Mean()`` of nothing) where clpeft reports n/a (None):
    a deliberate difference, so a one-experience run does not read as "no forgetting".
    """
    R = avalanche_run["R"]
    assert avalanche_run["after"][0][_STREAM_BWT] == 0.0 and summarize(R[:1, :1])["bwt"] is None
    for i, d in enumerate(avalanche_run["after"][1:], start=1):
        assert summarize(R[: i + 1, : i + 1])["bwt"] == pytest.approx(d[_STREAM_BWT], abs=1e-12)
    final = avalanche_run["after"][-1]
    assert summarize(R)["bwt"] == pytest.approx(final[_STREAM_BWT], abs=1e-12)
    for j in range(T_AVL - 1):
        assert final[_EXP_BWT.format(j)] == pytest.approx(R[-1, j] - R[j, j], abs=1e-12)


def test_avalanche_forgetting_is_minus_bwt_and_below_chaudhry_forgetting(avalanche_run):
    """Avalanche ``StreamForgetting`` == -clpeft ``bwt``, and <= clpeft ``forgetting``.

    Avalanche's forgetting (forgetting_bwt.py, ``Forgetting.result_key``:
    ``return self.initial[k] - self.last[k]``) is "accuracy right after training on j minus
    accuracy now", averaged with weight 1 over j < T-1:
        StreamForgetting = 1/(T-1) * sum_{j<T-1} (R[j, j] - R[T-1, j]) = -bwt   (exactly).
    clpeft's forgetting (Chaudhry et al. 2018) replaces R[j, j] by max_{l<T-1} R[l, j]; since
    l = j is one of the candidates, max_{l<T-1} R[l, j] >= R[j, j], hence
        clpeft forgetting - StreamForgetting
            = 1/(T-1) * sum_{j<T-1} (max_{l<T-1} R[l, j] - R[j, j]) >= 0,
    with equality iff every column peaks (among rows < T-1) on the diagonal.
    """
    R = avalanche_run["R"]
    assert avalanche_run["after"][0][_STREAM_FORGET] == 0.0 and summarize(R[:1, :1])["forgetting"] is None  # n/a
    for i, d in enumerate(avalanche_run["after"][1:], start=1):
        sub = summarize(R[: i + 1, : i + 1])
        assert d[_STREAM_FORGET] == pytest.approx(-sub["bwt"], abs=1e-12)
        assert sub["forgetting"] >= d[_STREAM_FORGET] - 1e-12

    final = avalanche_run["after"][-1]
    out = summarize(R, test_sizes=avalanche_run["test_sizes"])
    avl_forgetting = final[_STREAM_FORGET]
    assert avl_forgetting == pytest.approx(-out["bwt"], abs=1e-12)
    assert out["forgetting"] >= avl_forgetting - 1e-12
    gap = np.mean([R[: T_AVL - 1, j].max() - R[j, j] for j in range(T_AVL - 1)])
    assert out["forgetting"] - avl_forgetting == pytest.approx(gap, abs=1e-12)
    for j in range(T_AVL - 1):
        assert final[_EXP_FORGET.format(j)] == pytest.approx(R[j, j] - R[-1, j], abs=1e-12)
    # the last experience has no forgetting value in Avalanche (only its ``initial`` is set)
    assert _EXP_FORGET.format(T_AVL - 1) not in final


def test_avalanche_accuracies_match_the_right_clpeft_keys(avalanche_run):
    """Which Avalanche accuracy is which clpeft key.

    * ``Top1_Acc_Stream`` (accuracy.py, ``StreamAccuracy``, reset_at="stream"; ``Accuracy.update``
      does ``Mean.update(tp / n, n)``) is pooled over all samples of the stream, i.e.
      sample-weighted: after the last step it equals clpeft ``acc_last`` = ``acc_seen[T-1]``
      *with test_sizes*, not ``acc_final``. (After step i < T-1 it also pools the unseen
      experiences, which no clpeft key does.)
    * clpeft ``acc_final`` (GEM ACC) = unweighted mean of the final ``Top1_Acc_Exp`` values.
    * ``Accuracy_On_Trained_Experiences`` (``TrainedExperienceAccuracy``: only updates when
      ``current_experience <= last trained``, pooled) after step i == clpeft ``acc_seen[i]``
      with test_sizes.
    """
    R = avalanche_run["R"]
    sizes = avalanche_run["test_sizes"]
    after = avalanche_run["after"]
    out = summarize(R, test_sizes=sizes)
    final = after[-1]

    assert out["acc_last"] == pytest.approx(final[_STREAM_ACC], abs=1e-12)
    assert out["acc_seen"][-1] == pytest.approx(final[_STREAM_ACC], abs=1e-12)
    per_exp_final = [final[_EXP.format(j)] for j in range(T_AVL)]
    assert out["acc_final"] == pytest.approx(float(np.mean(per_exp_final)), abs=1e-12)
    # the two are genuinely different numbers in this run (unequal sizes)
    assert out["acc_final"] != pytest.approx(final[_STREAM_ACC], abs=1e-6)

    for i in range(T_AVL):
        assert out["acc_seen"][i] == pytest.approx(after[i][_TRAINED_ACC], abs=1e-12)
    assert out["acc_avg_incremental"] == pytest.approx(float(np.mean([after[i][_TRAINED_ACC] for i in range(T_AVL)])), abs=1e-12)
    # Without test sizes clpeft weights experiences equally, so acc_last == acc_final.
    unweighted = summarize(R)
    assert unweighted["acc_last"] == pytest.approx(unweighted["acc_final"], abs=1e-12)


def test_avalanche_forward_transfer_equals_clpeft_fwt(avalanche_run):
    """Avalanche ``StreamForwardTransfer`` == clpeft ``fwt`` with baseline = pre-training row.

    forward_transfer.py: the first evaluation (``at_init``) stores ``initial[k]`` = b_k; later
    evaluations store ``previous[k]`` when ``train_exp_id == eval_exp_id - 1`` (= R[k-1, k]);
    ``result_key`` = ``previous[k] - initial[k]``, averaged with weight 1 over k in ``previous``.
    After the last step that is k = 1..T-1: 1/(T-1) * sum_{k>=1} (R[k-1, k] - b_k) = GEM FWT.
    (After step i < T-1 it already includes k = i+1, so it equals clpeft fwt of the
    (i+2) x (i+2) leading block.)
    """
    R = avalanche_run["R"]
    b = avalanche_run["baseline"]
    after = avalanche_run["after"]
    out = summarize(R, test_sizes=avalanche_run["test_sizes"], baseline=b)
    assert out["fwt"] == pytest.approx(after[-1][_STREAM_FWT], abs=1e-12)
    for i in range(T_AVL - 1):
        sub = summarize(R[: i + 2, : i + 2], baseline=b[: i + 2])
        assert sub["fwt"] == pytest.approx(after[i][_STREAM_FWT], abs=1e-12)


# --------------------------------------------------------------------------------------------
# 4. Properties (hypothesis) against a naive loop implementation
# --------------------------------------------------------------------------------------------


def _reference(R, sizes=None, baseline=None):
    """DESIGN.md's definitions, written as plainly as possible (loops, no numpy)."""
    T = len(R)
    n = [1.0] * T if sizes is None else [float(s) for s in sizes]
    seen = []
    for i in range(T):
        num = sum(n[j] * R[i][j] for j in range(i + 1))
        den = sum(n[j] for j in range(i + 1))
        seen.append(num / den)
    ref = {
        "acc_final": sum(R[T - 1][j] for j in range(T)) / T,
        "acc_seen": seen,
        "acc_last": seen[T - 1],
        "acc_avg_incremental": sum(seen) / T,
        "bwt": None,
        "forgetting": None,
    }
    if T > 1:
        ref["bwt"] = sum(R[T - 1][j] - R[j][j] for j in range(T - 1)) / (T - 1)
        ref["forgetting"] = sum(max(R[i][j] for i in range(T - 1)) - R[T - 1][j] for j in range(T - 1)) / (T - 1)
    if baseline is not None:
        ref["fwt"] = sum(R[j - 1][j] - baseline[j] for j in range(1, T)) / (T - 1) if T > 1 else None
    return ref


_unit = st.floats(min_value=0.0, max_value=1.0, allow_nan=False, allow_infinity=False)


@st.composite
def runs(draw, min_t=1, max_t=7):
    T = draw(st.integers(min_t, max_t))
    R = [[draw(_unit) for _ in range(T)] for _ in range(T)]
    sizes = [draw(st.integers(1, 10_000)) for _ in range(T)]
    baseline = [draw(_unit) for _ in range(T)]
    return R, sizes, baseline


_settings = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _assert_same(out, ref):
    assert set(out) == set(ref)
    for k in ref:
        assert (out[k] is None) if ref[k] is None else out[k] == pytest.approx(ref[k], abs=1e-12), k


@_settings
@given(runs())
def test_property_matches_reference(run):
    R, sizes, baseline = run
    _assert_same(summarize(R, test_sizes=sizes, baseline=baseline), _reference(R, sizes, baseline))
    _assert_same(summarize(R), _reference(R))


@_settings
@given(runs(min_t=2))
def test_property_forgetting_at_least_minus_bwt(run):
    # forgetting_j = max_{l<T-1} R[l,j] - R[T-1,j] >= R[j,j] - R[T-1,j] = -bwt_j because
    # l = j < T-1 is among the candidates; averaging over j keeps the inequality.
    R, _, _ = run
    out = summarize(R)
    assert out["forgetting"] >= -out["bwt"] - 1e-12


@_settings
@given(runs(min_t=2))
def test_property_forgetting_equals_minus_bwt_when_columns_peak_on_diagonal(run):
    R, _, _ = run
    R = np.array(R)
    T = len(R)
    for j in range(T - 1):
        R[j, j] = R[: T - 1, j].max()
    out = summarize(R)
    assert out["forgetting"] == pytest.approx(-out["bwt"], abs=1e-12)


@_settings
@given(runs(), st.integers(1, 1000))
def test_property_equal_sizes_equal_unweighted(run, c):
    R, _, _ = run
    T = len(R)
    weighted = summarize(R, test_sizes=[c] * T)
    plain = summarize(R)
    _assert_same(weighted, plain)
    for i in range(T):
        assert plain["acc_seen"][i] == pytest.approx(float(np.mean(R[i][: i + 1])), abs=1e-12)


@_settings
@given(runs(), st.floats(min_value=1e-3, max_value=1e3))
def test_property_invariant_to_scaling_test_sizes(run, k):
    R, sizes, baseline = run
    a = summarize(R, test_sizes=sizes, baseline=baseline)
    b = summarize(R, test_sizes=[k * s for s in sizes], baseline=baseline)
    _assert_same(b, a)


@_settings
@given(runs(), st.data())
def test_property_acc_and_bwt_ignore_future_entries(run, data):
    """acc_*, bwt never read R[i, j] with j > i; fwt reads only the superdiagonal of those."""
    R, sizes, baseline = run
    T = len(R)
    R2 = [row[:] for row in R]
    for i in range(T):
        for j in range(i + 1, T):
            R2[i][j] = data.draw(_unit)
    a = summarize(R, test_sizes=sizes, baseline=baseline)
    b = summarize(R2, test_sizes=sizes, baseline=baseline)
    for k in ("acc_final", "acc_last", "acc_avg_incremental", "bwt"):
        assert a[k] == b[k], k
    assert a["acc_seen"] == b["acc_seen"]
    # restoring only the superdiagonal restores fwt
    for j in range(1, T):
        R2[j - 1][j] = R[j - 1][j]
    fwt = summarize(R2, baseline=baseline)["fwt"]
    assert fwt is None and a["fwt"] is None if T == 1 else fwt == pytest.approx(a["fwt"], abs=1e-12)


@_settings
@given(runs())
def test_property_ranges_and_internal_consistency(run):
    R, sizes, baseline = run
    out = summarize(R, test_sizes=sizes, baseline=baseline)
    T = len(R)
    assert len(out["acc_seen"]) == T
    assert out["acc_seen"][0] == pytest.approx(R[0][0], abs=1e-12)
    assert out["acc_last"] == out["acc_seen"][-1]
    assert out["acc_avg_incremental"] == pytest.approx(float(np.mean(out["acc_seen"])), abs=1e-12)
    for i in range(T):
        lo, hi = min(R[i][: i + 1]), max(R[i][: i + 1])
        assert lo - 1e-12 <= out["acc_seen"][i] <= hi + 1e-12
    for k in ("acc_final", "acc_last", "acc_avg_incremental"):
        assert -1e-12 <= out[k] <= 1 + 1e-12
    for k in ("bwt", "forgetting", "fwt"):
        assert out[k] is None if T == 1 else -1 - 1e-12 <= out[k] <= 1 + 1e-12


@_settings
@given(runs(min_t=2), st.data())
def test_property_any_nan_refused_with_its_position(run, data):
    R, _, _ = run
    T = len(R)
    i = data.draw(st.integers(0, T - 1), label="i")
    j = data.draw(st.integers(0, T - 1), label="j")
    R = [row[:] for row in R]
    R[i][j] = float("nan")
    with pytest.raises(ValueError, match=rf"[\[(]{i},\s*{j}[\])]"):
        summarize(R)
