"""FeCAM, EASE and CoFiMA (LAMDA-PILOT's pretrained-model methods) through the engine on offline streams.

Each runs on sklearn's digits with a tiny model on the CPU: FeCAM's predictions are recomputed
in numpy from the frozen backbone's own features, the orderings its paper reports are checked
against the simpler methods, and an interrupted run resumes to the same accuracy matrix.
"""

from __future__ import annotations

import numpy as np
import torch

FROZEN_MLP = {"name": "mlp", "hidden": [64, 32], "freeze": True}


def _config(tmp_path, strategy: dict, backbone: dict = FROZEN_MLP, epochs: int = 2, n_experiences: int = 5) -> dict:
    return {
        "seed": 0,
        "scenario": {"name": "class_incremental", "dataset": "sklearn_digits", "n_experiences": n_experiences,
                     "train_per_class": 60, "test_per_class": 20, "root": str(tmp_path / "data")},
        "backbone": backbone,
        "strategy": strategy,
        "train": {"epochs": epochs, "batch_size": 16, "lr": 0.05, "feature_cache": "memory"},
        "eval": {"batch_size": 256, "baseline": False},
        "logging": {"tensorboard": False, "progress": "never", "keep_checkpoints": 5},
    }


@torch.no_grad()
def _features(strategy, stream, split: str) -> tuple[np.ndarray, np.ndarray]:
    """The backbone's features of every experience's ``split`` data, computed directly."""
    backbone = strategy.backbone.eval()
    xs, ys = [], []
    for exp in stream:
        view = getattr(exp, split)
        x, y = view.load(torch.arange(len(view)))
        xs.append(backbone(x).double().numpy())
        ys.append(y.numpy())
    return np.concatenate(xs), np.concatenate(ys)


# ---------------------------------------------------------------------------------- FeCAM


def _fecam_distances(f: np.ndarray, y: np.ndarray, test_f: np.ndarray) -> np.ndarray:
    """FeCAM eq. 4 with eq. 6's shrinkage (gamma_1 = gamma_2 = 1) and the correlation normalisation, in numpy."""
    unit = lambda v: v / np.linalg.norm(v, axis=-1, keepdims=True)  # noqa: E731
    distances = []
    for c in range(10):
        cov = np.cov(f[y == c].T)
        off = cov - np.diag(np.diag(cov))
        v1, v2 = np.diag(cov).mean(), off[off != 0].mean()
        shrunk = cov + v1 * np.eye(len(cov)) + v2 * (1 - np.eye(len(cov)))
        sd = np.sqrt(np.diag(shrunk))
        diff = unit(test_f) - unit(f[y == c].mean(0))
        distances.append(np.einsum("nd,de,ne->n", diff, np.linalg.pinv(shrunk / np.outer(sd, sd)), diff))
    return np.stack(distances, 1)


def test_fecam_is_the_shrunk_normalised_mahalanobis_classifier(tmp_path, run_keeping):
    """The final logits are minus FeCAM's distances recomputed in numpy from the frozen MLP's features
    (every class's covariance from its 60 samples), and the last accuracy row is their argmin's."""
    result, strategy, stream = run_keeping(_config(tmp_path, {"name": "fecam"}), tmp_path / "run")
    f, y = _features(strategy, stream, "train")
    test_f, test_y = _features(strategy, stream, "test")
    expected = -_fecam_distances(f, y, test_f)
    with torch.no_grad():
        logits = strategy.predict(torch.tensor(test_f, dtype=torch.float32)).double().numpy()
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-4)
    bounds = np.cumsum([0] + [len(e.test) for e in stream])
    row = [float((expected[a:b].argmax(1) == test_y[a:b]).mean()) for a, b in zip(bounds[:-1], bounds[1:])]
    assert result["acc_matrix"][-1] == row


def test_fecam_beats_the_nearest_mean_it_extends_and_pilots_ridge_reduces_it_to_one(tmp_path, run_keeping):
    """FeCAM's class covariances beat SimpleCIL's cosine nearest mean on the same frozen features (the
    paper's ordering against NCM) and forget no more; PILOT's ``cov + 100 I`` swamps the covariances
    (their entries are ~1e-2 here, as ViT-B's), leaving a nearest mean of unit features: SimpleCIL's accuracy."""
    pilot = {"normalisation": "corrcoef", "ridge": 100.0, "shrinkage_diagonal": 0.0, "shrinkage_off_diagonal": 0.0}
    runs = {"fecam": {"name": "fecam"}, "fecam_pilot": {"name": "fecam", **pilot}, "simplecil": {"name": "simplecil"}}
    metrics = {name: run_keeping(_config(tmp_path, cfg), tmp_path / name)[0]["metrics"] for name, cfg in runs.items()}
    assert metrics["fecam"]["acc_last"] > metrics["simplecil"]["acc_last"] + 0.05, metrics
    assert metrics["fecam"]["forgetting"] <= metrics["simplecil"]["forgetting"], metrics
    assert abs(metrics["fecam_pilot"]["acc_last"] - metrics["simplecil"]["acc_last"]) <= 0.02, metrics


def test_fecam_interrupted_run_resumes_to_the_same_matrix(tmp_path, interrupted_then_resumed):
    full, resumed = interrupted_then_resumed(_config(tmp_path, {"name": "fecam"}), tmp_path)
    assert resumed == full
