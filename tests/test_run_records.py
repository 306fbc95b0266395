"""What the engine records for the reports: the final confusion counts, and the feature-cache
fill timed apart from training and evaluation.

Independent references: :func:`sklearn.metrics.confusion_matrix` on the predictions of the
trained strategy, recomputed here batch by batch; the cache's seconds against a stopwatch
around each fill (stretched by a known sleep, so counting it as training would show).
"""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from sklearn.metrics import confusion_matrix

from clpeft import config, feature_cache
from clpeft.engine import Engine
from clpeft.feature_cache import FeatureCache


def test_final_confusion_is_sklearns_on_the_trained_models_predictions(tmp_path, digits_run):
    digits_run["scenario"].update(n_experiences=3, init_classes=4)
    digits_run["train"]["epochs"] = 1
    engine = Engine(config.resolve(digits_run), tmp_path / "run", device="cpu")
    run = engine.build()
    result = engine.run(run)
    labels, predicted = [], []
    with torch.no_grad():
        for exp in run.stream:
            for batch in run.data.batches(exp.test, 64, uses_features=run.strategy.uses_features):
                labels.append(batch.y)
                predicted.append(run.strategy.predict(batch.x).argmax(1))
    y, p = torch.cat(labels).numpy(), torch.cat(predicted).numpy()
    expected = confusion_matrix(y, p, labels=np.arange(10))
    assert result["final_confusion"] == expected.tolist()
    # the counts agree with the last row of the accuracy matrix, experience by experience
    C = np.asarray(result["final_confusion"])
    for j, exp in enumerate(run.stream):
        classes = exp.classes_in_this_experience
        assert C[classes].sum() == result["test_sizes"][j]
        assert np.trace(C[np.ix_(classes, classes)]) / C[classes].sum() == pytest.approx(result["acc_matrix"][-1][j])


@pytest.mark.parametrize("online", [False, True])
def test_the_feature_cache_fill_is_timed_apart_from_training(tmp_path, digits_run, monkeypatch, online):
    digits_run["scenario"]["n_experiences"] = 2
    digits_run["backbone"]["freeze"] = True
    digits_run["train"].update(epochs=1, feature_cache="memory")
    if online:
        digits_run["scenario"]["online"] = True
    fills: list[float] = []
    compute, flush = FeatureCache._compute, feature_cache._Store.flush

    def timed_compute(self, *args, **kwargs):  # the stopwatch around each fill
        t0 = time.perf_counter()
        compute(self, *args, **kwargs)
        fills.append(time.perf_counter() - t0)

    def slow_flush(self):  # called twice by each fill: a fill takes at least 0.4 s
        time.sleep(0.2)
        flush(self)

    monkeypatch.setattr(FeatureCache, "_compute", timed_compute)
    monkeypatch.setattr(feature_cache._Store, "flush", slow_flush)
    result = Engine(config.resolve(digits_run), tmp_path / "run", device="cpu").run()
    timing = result["timing"]
    assert len(fills) >= 2  # the test sets (baseline) and the training data
    assert timing["cache_s"] == pytest.approx(sum(fills), abs=0.05)
    assert sum(t["cache_s"] for t in timing["experiences"]) == pytest.approx(timing["cache_s"])
    assert timing["experiences"][0]["cache_s"] >= 0.8 > timing["experiences"][0]["train_s"]
    assert timing["train_s"] + timing["eval_s"] < 0.8  # what a tiny MLP takes, without the sleeps
