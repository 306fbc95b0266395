"""SLCA and APER through the engine on the sklearn-digits stream.

SLCA runs on a small MLP (its whole backbone trains, slowly); APER on timm's tiny random-init
``test_vit`` at 32 px. APER's predictions are recomputed from scratch: the pre-trained model's
features, the adapted model's features with its LoRA updates merged into a plain copy of the
weights, class means of the concatenation, cosine similarities.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import clpeft.config
import clpeft.engine
import clpeft.run
from clpeft.backbones.timm_backbone import TimmBackbone
from clpeft.backbones.vit import ForwardPassCounter
from clpeft.components.lora import lora_layers
from clpeft.strategies.slca import SLCA

VIT = {"name": "timm", "model": "test_vit", "img_size": 32, "freeze": True}
MLP = {"name": "mlp", "hidden": [64], "freeze": False}


def _config(tmp_path, strategy: dict, backbone: dict, per_class: int, epochs: int, lr: float, **logging):
    return clpeft.config.resolve(
        {
            "seed": 0,
            "scenario": {
                "name": "class_incremental",
                "dataset": "sklearn_digits",
                "n_experiences": 5,
                "train_per_class": per_class,
                "test_per_class": 20,
                "root": str(tmp_path / "data"),
            },
            "backbone": backbone,
            "strategy": strategy,
            "train": {"epochs": epochs, "batch_size": 16, "lr": lr, "optimizer": "sgd", "feature_cache": "memory"},
            "eval": {"batch_size": 256, "baseline": False},
            "logging": {"tensorboard": False, "progress": "never", **logging},
        }
    )


def slca_config(tmp_path, **params):
    return _config(tmp_path, {"name": "slca", **params}, MLP, per_class=60, epochs=3, lr=0.05)


def aper_config(tmp_path, **params):
    return _config(tmp_path, {"name": "aper", **params}, VIT, per_class=12, epochs=3, lr=0.05)


@pytest.fixture
def spy(monkeypatch):
    """Runs the engine and keeps what it built (stream, strategy), every optimizer it made, and
    a snapshot of the strategy's state after every experience."""
    record = {}
    make_optimizer = clpeft.run.make_optimizer

    def spy_optimizer(groups, train):
        record["optimizers"].append(make_optimizer(groups, train))
        return record["optimizers"][-1]

    monkeypatch.setattr(clpeft.run, "make_optimizer", spy_optimizer)

    def run(tmp_path, cfg, out="run", on_build=None):
        record.update(optimizers=[], states=[], config=cfg)
        engine = clpeft.engine.Engine(cfg, tmp_path / out, device="cpu")
        built = engine.build()
        strategy = built.strategy
        record.update(stream=built.stream, strategy=strategy, input_shape=built.scenario.input_shape, initial=_snapshot(strategy))
        after = strategy.after_experience

        def spy_after(exp):
            after(exp)
            record["states"].append(_snapshot(strategy))

        strategy.after_experience = spy_after
        if on_build is not None:
            on_build(built)
        record["result"] = engine.run(built)
        return record

    return run


def _snapshot(strategy) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in strategy.state_dict().items() if isinstance(v, torch.Tensor)}


def _data(record, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    views = [getattr(exp, split) for exp in record["stream"]]
    xs, ys = zip(*(v.load(torch.arange(len(v))) for v in views))
    return torch.cat(xs), torch.cat(ys)


def _fresh_copy(record):
    """A strategy built from the same config on a differently initialised backbone, loaded from the state dict."""
    cfg = record["config"]
    torch.manual_seed(123)
    backbone = cfg.backbone.cls(input_shape=record["input_shape"], **cfg.backbone.params)
    fresh = cfg.strategy.cls(backbone, **cfg.strategy.params)
    fresh.load_state_dict(record["strategy"].state_dict())
    return fresh.eval()


def _unit(a: np.ndarray) -> np.ndarray:
    return a / np.linalg.norm(a, axis=1, keepdims=True)


def _old_class_accuracy(result) -> float:
    last = result["acc_matrix"][-1]
    return float(np.average(last[:-1], weights=result["test_sizes"][:-1]))


# ---------------------------------------------------------------------- SLCA


def test_slca_alignment_raises_old_class_accuracy(tmp_path, spy):
    aligned = spy(tmp_path, slca_config(tmp_path), out="aligned")["result"]
    plain = spy(tmp_path, slca_config(tmp_path, align=False), out="plain")["result"]
    assert aligned["acc_matrix"][0] == plain["acc_matrix"][0]  # nothing to align after the first task
    assert _old_class_accuracy(aligned) > _old_class_accuracy(plain) + 0.15
    assert aligned["metrics"]["acc_last"] > plain["metrics"]["acc_last"] + 0.1


def test_slca_backbone_group_learns_at_one_hundredth_of_the_rate(tmp_path, spy):
    record = spy(tmp_path, slca_config(tmp_path))
    strategy = record["strategy"]
    backbone, head = [p for p in strategy.backbone.parameters()], list(strategy.head.parameters())
    assert len(record["optimizers"]) == 5
    for i, optimizer in enumerate(record["optimizers"]):
        slow, fast = optimizer.param_groups
        assert slow["lr"] == 0.05 * 0.01 and fast["lr"] == 0.05
        assert [id(p) for p in slow["params"]] == [id(p) for p in backbone]
        assert [p.shape for p in fast["params"]] == [(2 * i + 2, 64), (2 * i + 2,)]  # the head grown to this task
    assert [id(p) for p in fast["params"]] == [id(p) for p in head]
    first, last = record["states"][0], record["states"][-1]
    assert not torch.equal(first["backbone.net.0.weight"], last["backbone.net.0.weight"])  # the backbone does learn


def test_slca_trains_the_unaligned_head_and_predicts_with_the_aligned_copy(tmp_path, spy):
    """The official fc.backup()/fc.recall(): alignment changes only the predicting copy; the
    trained head's old rows get no gradient (class mask) and, as the official frozen older heads,
    no weight decay either: they stay bitwise (checked with a weight decay of 5e-4)."""
    cfg = slca_config(tmp_path)
    cfg.train.weight_decay = 5e-4
    record = spy(tmp_path, cfg)
    states, strategy = record["states"], record["strategy"]
    assert states[0]["aligned.head.weight"].shape[0] == 0
    for i in range(1, 5):
        known = 2 * i
        assert torch.equal(states[i]["head.weight"][:known], states[i - 1]["head.weight"][:known])
        assert states[i]["aligned.head.weight"].shape[0] == known + 2
        assert not torch.equal(states[i]["aligned.head.weight"], states[i]["head.weight"])
    x, _ = _data(record, "test")
    with torch.no_grad():
        features = strategy.backbone(x)
        assert torch.equal(strategy.predict(x), strategy.aligned.head(features))


def test_slca_reset_final_norm_is_the_official_fresh_layer_norm():
    """``reset_final_norm``: the official ViT (GengDavid/SLCA ``convs/vits.py``) swaps the
    pre-trained final LayerNorm for ``nn.LayerNorm(768)``: weight 1, bias 0, eps 1e-5, trained
    with the backbone; the features are that norm of the class token."""
    torch.manual_seed(0)
    backbone = TimmBackbone((3, 32, 32), model="test_vit", img_size=32, freeze=False)
    with torch.no_grad():
        backbone.net.norm.weight.uniform_(0.5, 1.5)  # not the identity, as a pre-trained norm
    x = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    with torch.no_grad():
        tokens = backbone.net.blocks(backbone.net._pos_embed(backbone.net.patch_embed(backbone.preprocess(x))))
    strategy = SLCA(backbone, reset_final_norm=True)
    norm = strategy.backbone.net.norm
    assert isinstance(norm, torch.nn.LayerNorm) and norm.eps == 1e-5 and norm.weight.requires_grad
    assert torch.equal(norm.weight, torch.ones(64)) and torch.equal(norm.bias, torch.zeros(64))
    with torch.no_grad():
        torch.testing.assert_close(strategy.backbone(x), torch.nn.functional.layer_norm(tokens[:, 0], (64,), eps=1e-5))


def test_slca_state_dict_into_a_fresh_strategy_gives_identical_predictions(tmp_path, spy):
    record = spy(tmp_path, slca_config(tmp_path))
    x, _ = _data(record, "test")
    with torch.no_grad():
        assert torch.equal(record["strategy"].eval().predict(x), _fresh_copy(record).predict(x))


# ---------------------------------------------------------------------- APER


def _peft_state(state: dict, strategy) -> dict[str, torch.Tensor]:
    prefix = "prompt_tokens" if strategy.peft == "vpt" else "adapted."
    shared = {f"adapted.{k}" for k in strategy.backbone.state_dict()}
    return {k: v for k, v in state.items() if k.startswith(prefix) and k not in shared}


@pytest.mark.parametrize("peft", ["adapter", "vpt", "lora"])
def test_aper_adapts_only_in_the_first_experience_and_never_moves_the_backbone(tmp_path, spy, peft):
    record = spy(tmp_path, aper_config(tmp_path, peft=peft))
    strategy, initial, states = record["strategy"], record["initial"], record["states"]
    optimizers = record["optimizers"]
    assert optimizers[0] is not None and optimizers[1:] == [None] * 4  # no gradient step after the first experience
    assert {id(p) for g in optimizers[0].param_groups for p in g["params"]} == {
        id(p) for p in [*strategy.peft_parameters(), *strategy.adapt_head.parameters()]
    }
    backbone = {k for k in initial if k.startswith("backbone.")}
    for state in states:
        assert all(torch.equal(state[k], initial[k]) for k in backbone)
    peft_before, peft_after = _peft_state(initial, strategy), _peft_state(states[0], strategy)
    assert peft_after and any(not torch.equal(peft_before[k], v) for k, v in peft_after.items())
    for state in states[1:]:
        assert all(torch.equal(state[k], v) for k, v in peft_after.items())
    assert record["result"]["parameters"]["trainable"] == 0


def test_aper_runs_the_pretrained_model_once_per_sample_and_the_adapted_one_only_where_needed(tmp_path, spy, monkeypatch):
    """phi comes from the feature cache (one pass per sample over the whole run); phi* runs for
    the adaptation steps, once per training sample for the prototypes, once per test sample per
    evaluation -- not twice, as a two-branch network recomputing both would."""
    counters = {}

    def count(built):
        counters.update(pretrained=ForwardPassCounter(built.strategy.backbone.net), adapted=ForwardPassCounter(built.strategy.adapted.net))

    record = spy(tmp_path, aper_config(tmp_path, peft="adapter"), on_build=count)
    stream = record["stream"]
    n_train, n_test = sum(len(e.train) for e in stream), sum(len(e.test) for e in stream)
    assert counters["pretrained"].samples == n_train + n_test
    assert counters["adapted"].samples == 3 * len(stream[0].train) + n_train + len(stream) * n_test


def test_aper_predicts_the_cosine_nearest_class_mean_of_concatenated_features(tmp_path, spy):
    record = spy(tmp_path, aper_config(tmp_path, peft="lora", lora_rank=4, lora_alpha=8.0))
    strategy = record["strategy"]
    layers = lora_layers(strategy.adapted)
    assert any(torch.count_nonzero(layer.lora_B) for layer in layers.values())
    with torch.no_grad():
        # the adapted model, rebuilt independently: the plain pre-trained model with W + (alpha/r) B A
        merged = copy.deepcopy(strategy.backbone)
        for name, layer in layers.items():
            merged.get_submodule(name).weight += (layer.lora_B @ layer.lora_A) * 2.0

        def features(split):
            x, y = _data(record, split)
            return torch.cat([strategy.backbone(x), merged(x)], 1).double().numpy(), y.numpy(), x

        f, y, _ = features("train")
        test_f, test_y, test_x = features("test")
        logits = strategy.predict(test_x).double().numpy()
    means = np.stack([f[y == c].mean(0) for c in range(10)])
    expected = _unit(test_f) @ _unit(means).T
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)
    half = f.shape[1] // 2  # the adapted half matters: prototypes of the pre-trained half alone differ
    pretrained_only = _unit(test_f[:, :half]) @ _unit(means[:, :half]).T
    assert np.abs(pretrained_only - expected).max() > 1e-3
    sizes = np.cumsum([0] + [len(e.test) for e in record["stream"]])
    row = [float((expected[a:b].argmax(1) == test_y[a:b]).mean()) for a, b in zip(sizes[:-1], sizes[1:])]
    assert record["result"]["acc_matrix"][-1] == row


@pytest.mark.parametrize("peft", ["adapter", "vpt"])
def test_aper_state_dict_into_a_fresh_strategy_gives_identical_predictions(tmp_path, spy, peft):
    record = spy(tmp_path, aper_config(tmp_path, peft=peft))
    x, _ = _data(record, "test")
    with torch.no_grad():
        assert torch.equal(record["strategy"].eval().predict(x), _fresh_copy(record).predict(x))


def test_aper_resume_gives_the_same_accuracy_matrix(tmp_path, spy):
    cfg = _config(tmp_path, {"name": "aper"}, VIT, per_class=12, epochs=3, lr=0.05, keep_checkpoints=5)
    reference = spy(tmp_path, cfg)["result"]["acc_matrix"]
    run = tmp_path / "run"
    for stale in ("exp_002.pt", "exp_002.pt.sha256", "exp_003.pt", "exp_003.pt.sha256", "exp_004.pt", "exp_004.pt.sha256"):
        (run / "checkpoints" / stale).unlink()
    (run / "metrics.json").unlink()
    resumed = clpeft.engine.Engine(cfg, run, device="cpu", resume=True).run()
    assert resumed["acc_matrix"] == reference
