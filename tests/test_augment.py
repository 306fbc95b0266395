"""``train.augment`` in the engine: augmented training batches, never served from the feature cache.

The recipes themselves are compared with the official torchvision pipelines in
``tests/reference/test_augment.py``; here: where the engine applies them, what it caches, that a
run stays repeatable and resumable, and one-line errors for configs it cannot serve.
"""

from __future__ import annotations

import pytest
import yaml

from clpeft import config
from clpeft.cli import main
from clpeft.engine import Engine
from clpeft.feature_cache import FeatureCache
from clpeft.run import Run
from clpeft.strategy import Strategy


def _frozen(digits_run, augment):
    digits_run["scenario"]["n_experiences"] = 2
    digits_run["backbone"]["freeze"] = True
    digits_run["train"].update(epochs=2, augment=augment)
    return digits_run


def test_augmented_training_batches_bypass_the_cache_and_evaluation_uses_it(digits_run, tmp_path, monkeypatch):
    seen, cache_calls = [], {"train": 0, "eval": 0}
    phase = {"now": "eval"}
    original_step, original_features = Strategy.training_step, FeatureCache.features

    def spy_step(self, batch):
        phase["now"] = "train"
        seen.append(batch.x.detach().clone())
        return original_step(self, batch)

    def spy_features(self, view):
        cache_calls[phase["now"]] += 1
        return original_features(self, view)

    def spy_evaluate(self, *args, **kwargs):
        phase["now"] = "eval"
        return evaluate(self, *args, **kwargs)

    evaluate = Run.evaluate
    monkeypatch.setattr(Strategy, "training_step", spy_step)
    monkeypatch.setattr(FeatureCache, "features", spy_features)
    monkeypatch.setattr(Run, "evaluate", spy_evaluate)
    cfg = config.resolve(_frozen(digits_run, "crop_flip"))
    Engine(cfg, tmp_path / "run", device="cpu").run()
    assert seen and all(x.shape[1] == 64 for x in seen)  # features of the frozen MLP, computed per step
    assert cache_calls["train"] == 0 and cache_calls["eval"] > 0


def test_without_augment_training_reads_the_cache(digits_run, tmp_path, monkeypatch):
    calls = []
    original = FeatureCache.features
    monkeypatch.setattr(FeatureCache, "features", lambda self, view: calls.append(len(view)) or original(self, view))
    Engine(config.resolve(_frozen(digits_run, "none")), tmp_path / "run", device="cpu").run()
    assert calls  # the same config without augmentation is served by the cache


def test_an_augmented_run_repeats_and_resumes_bitwise(digits_run, tmp_path):
    digits_run["train"]["augment"] = [{"name": "RandomCrop", "size": 8, "padding": 1}, {"name": "RandomHorizontalFlip"}]
    digits_run["scenario"]["n_experiences"] = 3
    digits_run["scenario"]["init_classes"] = 4
    digits_run["train"]["epochs"] = 2
    cfg = config.resolve(digits_run)
    a = Engine(cfg, tmp_path / "a", device="cpu").run()["acc_matrix"]
    b = Engine(cfg, tmp_path / "b", device="cpu").run()["acc_matrix"]
    plain = config.resolve({**digits_run, "train": {**digits_run["train"], "augment": "none"}})
    c = Engine(plain, tmp_path / "c", device="cpu").run()["acc_matrix"]
    assert a == b and a != c  # repeatable, and augmentation really changed training
    for lost in (tmp_path / "a" / "checkpoints").glob("exp_002.pt*"):  # the last experience is lost ...
        lost.unlink()
    (tmp_path / "a" / "metrics.json").unlink()
    assert Engine(cfg, tmp_path / "a", device="cpu", resume=True).run()["acc_matrix"] == a  # ... and redone exactly


@pytest.mark.parametrize(
    ("augment", "message"),
    [
        ("crop_flp", "train.augment: value error, unknown recipe 'crop_flp'"),
        ([{"name": "Normalize", "mean": [0.5], "std": [0.5]}], "is not a torchvision.transforms.v2 augmentation"),
        ([{"name": "RandomCrop", "sise": 8}], "step 0 (RandomCrop): RandomCrop.__init__() got an unexpected keyword argument 'sise'"),
    ],
)
def test_bad_augment_configs_are_one_line(digits_run, tmp_path, capsys, augment, message):
    digits_run["train"]["augment"] = augment
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(digits_run))
    assert main(["validate", str(tmp_path / "c.yaml")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err


def test_augmenting_non_images_is_refused_in_one_line(tmp_path, capsys):
    import numpy as np

    rng = np.random.default_rng(0)
    np.savez(tmp_path / "f.npz", x=rng.normal(size=(40, 6)).astype("float32"), y=np.repeat(np.arange(4), 10))
    run = {
        "scenario": {"name": "class_incremental", "dataset": "npz", "root": str(tmp_path / "f.npz"), "n_experiences": 2},
        "backbone": {"name": "mlp", "scale": 1.0},
        "strategy": {"name": "finetune"},
        "train": {"augment": "crop_flip"},
        "logging": {"tensorboard": False, "progress": "never"},
    }
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(run))
    assert main(["run", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "o")]) == 2
    assert "train.augment transforms images, but this scenario's inputs have shape (6,)" in capsys.readouterr().err
