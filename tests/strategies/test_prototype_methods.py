"""SimpleCIL, RanPAC and FSA-LDA through the engine on the sklearn-digits stream.

The backbone is a frozen random MLP (FSA adapts it on the first experience), so every
prediction can be recomputed in numpy from the backbone's own features: class means (SimpleCIL),
the random-projection ridge solution (RanPAC), the LDA closed form (FSA).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import clpeft.config
import clpeft.engine
import clpeft.registry
import clpeft.run
from clpeft.backbones.mlp import MLPBackbone
from clpeft.components.heads.frozen_feature_classifier import FrozenFeatureClassifier
from clpeft.data import ArrayDataset, DataView
from clpeft.data_access import DataAccess
from clpeft.experience import Experience
from clpeft.feature_cache import FeatureCache

METHODS = {
    "simplecil": {"name": "simplecil"},
    "ranpac": {"name": "ranpac", "projection_dim": 256},
    "fsa_lda": {"name": "fsa_lda", "adapt": "last_blocks"},
}


MLP = {"name": "mlp", "hidden": [64, 32], "freeze": True}
VIT = {"name": "timm", "model": "test_vit", "img_size": 32, "freeze": True}


def _config(tmp_path, strategy: dict, backbone: dict = MLP, **logging) -> clpeft.config.RunConfig:
    return clpeft.config.resolve(
        {
            "seed": 0,
            "scenario": {
                "name": "class_incremental",
                "dataset": "sklearn_digits",
                "n_experiences": 5,
                "train_per_class": 60,
                "test_per_class": 20,
                "root": str(tmp_path / "data"),
            },
            "backbone": backbone,
            "strategy": strategy,
            "train": {"epochs": 2, "batch_size": 16, "lr": 0.05, "feature_cache": "memory"},
            "eval": {"batch_size": 256, "baseline": False},
            "logging": {"tensorboard": False, "progress": "never", **logging},
        }
    )


@pytest.fixture
def spy(monkeypatch):
    """Runs the engine and keeps what it built: the stream, the strategy, its data access,
    every optimizer it made and the backbone weights at the end of each experience."""
    record = {"optimizers": [], "backbone": [], "steps": 0}
    make_optimizer = clpeft.run.make_optimizer
    after, step = FrozenFeatureClassifier.after_experience, FrozenFeatureClassifier.training_step

    def spy_after(self, exp):
        after(self, exp)
        record["backbone"].append(_backbone_state(self))

    def spy_step(self, batch):
        record["steps"] += 1
        return step(self, batch)

    monkeypatch.setattr(
        clpeft.run, "make_optimizer", lambda *a: record["optimizers"].append(make_optimizer(*a)) or record["optimizers"][-1]
    )
    monkeypatch.setattr(FrozenFeatureClassifier, "after_experience", spy_after)
    monkeypatch.setattr(FrozenFeatureClassifier, "training_step", spy_step)

    def run(tmp_path, strategy: dict, out="run", backbone: dict = MLP, **kw):
        record.update(optimizers=[], backbone=[], steps=0)
        cfg = _config(tmp_path, strategy, backbone, **kw)
        engine = clpeft.engine.Engine(cfg, tmp_path / out, device="cpu")
        built = engine.build()
        record.update(
            stream=built.stream, strategy=built.strategy, input_shape=built.scenario.input_shape, initial=_backbone_state(built.strategy)
        )
        record["result"] = engine.run(built)
        return record

    return run


def _backbone_state(strategy) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in strategy.backbone.state_dict().items()}


@torch.no_grad()
def _features(record, split: str) -> tuple[np.ndarray, np.ndarray]:
    """The final backbone's features of every experience's ``split`` data, computed directly."""
    backbone = record["strategy"].backbone.eval()
    xs, ys = [], []
    for exp in record["stream"]:
        view = getattr(exp, split)
        x, y = view.load(torch.arange(len(view)))
        xs.append(backbone(x).double().numpy())
        ys.append(y.numpy())
    return np.concatenate(xs), np.concatenate(ys)


def _strategy_logits(record, features: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return record["strategy"].predict(torch.tensor(features, dtype=torch.float32)).double().numpy()


def _final_row(record, logits: np.ndarray, y: np.ndarray) -> list[float]:
    sizes = np.cumsum([0] + [len(e.test) for e in record["stream"]])
    return [float((logits[a:b].argmax(1) == y[a:b]).mean()) for a, b in zip(sizes[:-1], sizes[1:])]


def test_simplecil_is_the_cosine_nearest_class_mean(tmp_path, spy):
    record = spy(tmp_path, METHODS["simplecil"])
    f, y = _features(record, "train")
    test_f, test_y = _features(record, "test")
    means = np.stack([f[y == c].mean(0) for c in range(10)])
    expected = (test_f / np.linalg.norm(test_f, axis=1, keepdims=True)) @ (means / np.linalg.norm(means, axis=1, keepdims=True)).T
    np.testing.assert_allclose(_strategy_logits(record, test_f), expected, rtol=1e-5, atol=1e-6)
    assert record["result"]["acc_matrix"][-1] == _final_row(record, expected, test_y)


def test_ranpac_is_ridge_regression_on_random_relu_features(tmp_path, spy):
    record = spy(tmp_path, METHODS["ranpac"])
    strategy = record["strategy"]
    projection, ridge = strategy.projection.double().numpy(), float(strategy.ridge)
    assert ridge in strategy.ridge_candidates
    f, y = _features(record, "train")
    test_f, test_y = _features(record, "test")
    h, test_h = np.maximum(f @ projection, 0), np.maximum(test_f @ projection, 0)
    weights = np.linalg.solve(h.T @ h + ridge * np.eye(h.shape[1]), h.T @ np.eye(10)[y])  # (G + lambda I)^-1 C
    expected = test_h @ weights
    np.testing.assert_allclose(_strategy_logits(record, test_f), expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
    assert record["result"]["acc_matrix"][-1] == _final_row(record, expected, test_y)


def test_fsa_lda_is_the_lda_closed_form_on_the_adapted_features(tmp_path, spy):
    record = spy(tmp_path, METHODS["fsa_lda"])
    f, y = _features(record, "train")
    test_f, test_y = _features(record, "test")
    means = np.stack([f[y == c].mean(0) for c in range(10)])
    inv = np.linalg.inv(np.cov(f.T) + np.eye(f.shape[1]))  # the authors' torch.cov(features) + I
    expected = test_f @ inv @ means.T - 0.5 * np.einsum("cd,de,ce->c", means, inv, means)
    np.testing.assert_allclose(_strategy_logits(record, test_f), expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
    assert record["result"]["acc_matrix"][-1] == _final_row(record, expected, test_y)


def test_prototype_methods_forget_far_less_than_finetune(tmp_path, spy):
    results = {name: spy(tmp_path, cfg, out=name)["result"]["metrics"] for name, cfg in METHODS.items()}
    finetune = clpeft.engine.Engine(_config(tmp_path, {"name": "finetune"}), tmp_path / "finetune", device="cpu").run()["metrics"]
    assert finetune["forgetting"] > 0.8
    for name, metrics in results.items():
        assert metrics["forgetting"] < finetune["forgetting"] - 0.5, name
        assert metrics["acc_last"] > finetune["acc_last"] + 0.4, name


@pytest.mark.parametrize("name", ["simplecil", "ranpac"])
def test_nothing_to_train_means_no_optimizer_and_an_untouched_backbone(tmp_path, spy, name):
    record = spy(tmp_path, METHODS[name])
    assert record["optimizers"] == [None] * 5 and record["steps"] == 0
    assert record["result"]["parameters"]["trainable"] == 0
    for state in record["backbone"]:
        assert all(torch.equal(state[k], v) for k, v in record["initial"].items())


def test_fsa_trains_only_in_the_first_experience_then_its_backbone_is_fixed(tmp_path, spy):
    record = spy(tmp_path, METHODS["fsa_lda"])
    assert record["optimizers"][0] is not None and record["optimizers"][1:] == [None] * 4
    assert record["steps"] == 2 * -(-120 // 16)  # 2 epochs over 2 classes x 60 samples, then nothing
    first, *later = record["backbone"]
    assert not torch.equal(first["net.2.weight"], record["initial"]["net.2.weight"])  # the last block adapted
    assert torch.equal(first["net.0.weight"], record["initial"]["net.0.weight"])  # earlier blocks did not
    for state in later:
        assert all(torch.equal(state[k], v) for k, v in first.items())


@pytest.mark.parametrize("name", list(METHODS))
def test_state_dict_into_a_fresh_strategy_gives_identical_predictions(tmp_path, spy, name):
    record = spy(tmp_path, METHODS[name])
    strategy = record["strategy"]
    cfg = _config(tmp_path, METHODS[name])
    torch.manual_seed(123)  # a different random backbone and projection: the state dict must overwrite them
    backbone = cfg.backbone.cls(input_shape=record["input_shape"], **cfg.backbone.params)
    fresh = cfg.strategy.cls(backbone, **cfg.strategy.params)
    fresh.load_state_dict(strategy.state_dict())
    x, _ = record["stream"][0].test.load(torch.arange(len(record["stream"][0].test)))
    logits = []
    for s in (strategy, fresh.eval()):
        with torch.no_grad():  # each through its own backbone (predict takes features when they are cached)
            logits.append(s.predict(s.backbone(x) if s.uses_features else x))
    assert torch.equal(*logits)


@pytest.mark.parametrize("name", ["ranpac", "fsa_lda"])
def test_resume_gives_the_same_accuracy_matrix(tmp_path, spy, name):
    reference = spy(tmp_path, METHODS[name], keep_checkpoints=5)["result"]["acc_matrix"]
    run = tmp_path / "run"
    for stale in ("exp_003.pt", "exp_003.pt.sha256", "exp_004.pt", "exp_004.pt.sha256"):
        (run / "checkpoints" / stale).unlink()
    (run / "metrics.json").unlink()
    resumed = clpeft.engine.Engine(_config(tmp_path, METHODS[name], keep_checkpoints=5), run, device="cpu", resume=True).run()
    assert resumed["acc_matrix"] == reference


def test_ranpac_adapter_phase_trains_only_the_adapters_in_the_first_experience(tmp_path, spy):
    """RanPAC's headline phase 1 (``adapt: adapter``): AdaptFormer adapters in every block of the
    ViT train during the first experience only; no other backbone weight ever moves; afterwards
    the frozen adapted backbone's features come from the cache, and a fresh strategy loading the
    state predicts the same."""
    strategy_cfg = {"name": "ranpac", "projection_dim": 64, "adapt": "adapter", "adapter_bottleneck": 8}
    record = spy(tmp_path, strategy_cfg, backbone=VIT)
    assert record["optimizers"][0] is not None and record["optimizers"][1:] == [None] * 4
    first, *later = record["backbone"]
    adapters = [k for k in first if ".adapter." in k]
    assert len(adapters) == 4 * 6 and set(first) == set(record["initial"])  # down/up weight and bias in 6 blocks
    assert any(not torch.equal(first[k], record["initial"][k]) for k in adapters)
    assert all(torch.equal(first[k], record["initial"][k]) for k in first if k not in adapters)
    for state in later:
        assert all(torch.equal(state[k], v) for k, v in first.items())
    strategy = record["strategy"]
    assert strategy.uses_features and record["result"]["parameters"]["trainable"] == 0
    cfg = _config(tmp_path, strategy_cfg, VIT)
    torch.manual_seed(123)
    fresh = cfg.strategy.cls(cfg.backbone.cls(input_shape=record["input_shape"], **cfg.backbone.params), **cfg.strategy.params)
    fresh.load_state_dict(strategy.state_dict())
    fresh.eval().refresh_input_mode()
    x, _ = record["stream"][0].test.load(torch.arange(len(record["stream"][0].test)))
    with torch.no_grad():
        assert torch.equal(strategy.predict(strategy.backbone(x)), fresh.predict(fresh.backbone(x)))


@pytest.mark.parametrize("name", list(METHODS))
def test_statistics_passes_under_bf16_autocast_equal_those_without(name):
    """The statistics (class means, RanPAC's Gram matrix and sums, LDA's covariance) and the
    closed-form heads come out the same (float64, to 1e-12 relative) when ``after_experience``
    runs under a bf16 autocast, as it may on a GPU with ``train.amp``: features come from the
    cache in float32, accumulation is float64, RanPAC's projection and the heads turn autocast
    off. Mutation checked: RanPAC's ``transform`` without its ``torch.autocast(..., enabled=False)``
    block fails it (the projection then runs in bf16)."""
    g = torch.Generator().manual_seed(0)
    stream = []
    for task in range(2):
        y = torch.arange(2 * task, 2 * task + 2).repeat_interleave(30)
        x = torch.randn(len(y), 16, generator=g) + y[:, None].float()
        stream.append(
            Experience(task, DataView.of(ArrayDataset(x, y, f"t{task}")), None, [2 * task, 2 * task + 1], list(range(2 * task + 2)))
        )
    runs = []
    for autocast in (False, True):
        torch.manual_seed(0)
        params = {**METHODS[name], "adapt": "none"} if name == "fsa_lda" else METHODS[name]
        strategy = clpeft.registry.strategies.get(name)(
            MLPBackbone((16,), hidden=[32], freeze=True), **{k: v for k, v in params.items() if k != "name"}
        )
        cache = FeatureCache(strategy.backbone, torch.device("cpu"), 64)
        strategy.attach(DataAccess(torch.device("cpu"), cache, strategy.backbone, 16))
        for exp in stream:
            cache.features(exp.train)  # computed in float32, as the engine's cache stores them
            strategy.eval().before_experience(exp)
            torch.manual_seed(1)  # RanPAC's holdout split
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                strategy.after_experience(exp)
        runs.append({k: v for k, v in strategy.state_dict().items() if k.startswith(("stats.", "head.", "ridge"))})
    plain, under_autocast = runs
    for key, value in plain.items():
        assert under_autocast[key].dtype == value.dtype == torch.float64, key
        torch.testing.assert_close(under_autocast[key], value, rtol=1e-12, atol=1e-12, msg=key)
