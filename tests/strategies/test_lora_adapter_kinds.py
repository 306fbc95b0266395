"""The LoRA-based learners (lora_cl, lae, merge_cl) with every adapter kind of ``clpeft.components.lora.kinds``.

Each runs a tiny stream through the engine (scikit-learn digits, an MLP whose ``net.0`` and
``net.2`` carry the adapters) and is checked against what the kind must give: the layers of that
kind with only its trained tensors optimised, predictions rebuilt exactly from the state dict,
merge_cl's stored task vectors equal to the layers' whole updates; options a kind does not define
are refused in one line naming ``strategy.adapter``.
"""

from __future__ import annotations

import io

import pytest
import torch
from digits_configs import digits_mlp_config

import clpeft.config
from clpeft.backbones.mlp import MLPBackbone
from clpeft.components.lora import ADAPTER_KINDS, LoRAFactors
from clpeft.errors import UserError
from clpeft.merging import LoraAdapter
from clpeft.strategies.lae import LAE
from clpeft.strategies.lora_cl import LoRACL
from clpeft.strategies.merge_cl import MergeCL

TARGETS = ["net.0", "net.2"]
CLASSES = {
    "lora": "LoRALinear",
    "pissa": "LoRALinear",
    "dora": "DoRALinear",
    "vera": "VeRALinear",
    "lora_xs": "LoRAXSLinear",
    "adalora": "AdaLoRALinear",
}


def _config(tmp_path, strategy: dict) -> dict:
    return digits_mlp_config(tmp_path, strategy, n_experiences=3, init_classes=4)


def _round_trip_predicts_the_same(tmp_path, strategy_cfg, strategy, stream) -> None:
    buf = io.BytesIO()
    torch.save(strategy.state_dict(), buf)
    cfg = clpeft.config.resolve(_config(tmp_path, strategy_cfg))
    torch.manual_seed(123)  # a different random backbone: everything must come from the state dict
    backbone = cfg.backbone.cls(input_shape=tuple(stream[0].test.load()[0].shape[1:]), **cfg.backbone.params)
    fresh = cfg.strategy.cls(backbone, **cfg.strategy.params)
    fresh.load_state_dict(torch.load(io.BytesIO(buf.getvalue()), weights_only=False))
    strategy.eval(), fresh.eval()
    x = torch.cat([e.test.load()[0] for e in stream])
    with torch.no_grad():
        assert torch.equal(fresh.predict(x), strategy.predict(x))


@pytest.mark.parametrize("kind", ADAPTER_KINDS)
def test_lora_cl_trains_each_kinds_tensors_and_resumes_from_its_state(tmp_path, kind, run_keeping):
    cfg = {
        "name": "lora_cl",
        "targets": TARGETS,
        "rank": 2,
        "alpha": 4.0,
        "adapter": kind,
        "old_updates": "merge" if kind == "dora" else "freeze",
    }
    result, strategy, stream = run_keeping(_config(tmp_path, cfg), tmp_path / "run")
    assert {type(layer).__name__ for layer in strategy.lora.values()} == {CLASSES[kind]}
    trained = {n for n, p in strategy.backbone.named_parameters() if p.requires_grad}
    assert trained == set(LoRAFactors(strategy.lora).overrides())
    if kind != "dora":  # three retired rank-2 updates frozen beside the base weight (PiSSA: with their starts,
        frozen = 3 * 2 if kind != "pissa" else 3 * (2 + 2) + 2  # and the next update's start)
        assert all(layer.frozen_rank == frozen for layer in strategy.lora.values())
    assert result["metrics"]["acc_final"] > 1 / 10  # better than chance over the 10 digits
    _round_trip_predicts_the_same(tmp_path, cfg, strategy, stream)


@pytest.mark.parametrize("kind", ["lora", "pissa", "vera", "lora_xs", "adalora"])
def test_merge_cl_stores_each_layers_whole_update_as_its_task_vector(tmp_path, kind, monkeypatch, run_keeping):
    updates, after = [], MergeCL.after_experience

    def spy(self, exp):
        updates.append({f"{n}.weight": layer._whole_delta().detach().clone() for n, layer in self.lora.items()})
        after(self, exp)

    monkeypatch.setattr(MergeCL, "after_experience", spy)
    cfg = {"name": "merge_cl", "targets": TARGETS, "rank": 2, "alpha": 4.0, "adapter": kind}
    _, strategy, _ = run_keeping(_config(tmp_path, cfg), tmp_path / "run")
    assert len(strategy.finetuned) == 3
    for vector, update in zip(strategy.finetuned, updates, strict=True):
        adapter = LoraAdapter.from_state_dict(vector)
        for name, delta in update.items():
            got = adapter.delta(name, device=torch.device("cpu"), dtype=torch.float32).view_as(delta)
            torch.testing.assert_close(got, delta, rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind", ["dora", "vera"])
def test_lae_keeps_an_ema_of_each_kinds_tensors(tmp_path, kind, run_keeping):
    cfg = {
        "name": "lae",
        "targets": TARGETS,
        "rank": 2,
        "alpha": 2.0,
        "adapter": kind,
        "learnable_scale": False,
        "freeze_epochs": 0,
        "ema_momentum": 0.5,
    }
    _, strategy, stream = run_keeping(_config(tmp_path, cfg), tmp_path / "run")
    online = LoRAFactors(strategy.lora).overrides()
    offline = strategy.offline.model.overrides()
    assert set(online) == set(offline)
    assert any("lora_magnitude_vector" in n or "lora_lambda_b" in n for n in online)
    assert any(not torch.equal(online[n], offline[n]) for n in online)  # the EMA lags behind
    _round_trip_predicts_the_same(tmp_path, cfg, strategy, stream)


def test_options_a_kind_lacks_are_refused_in_one_line_naming_the_key():
    backbone = MLPBackbone((8, 8), hidden=[16])
    cases = [
        (lambda: LoRACL(backbone, targets=["net.0"], adapter="dora"), "freezing an update .* dora .*old_updates: merge"),
        (lambda: LoRACL(backbone, targets=["net.0"], adapter="vera", rank_budget=8), "rank pruning .* vera"),
        (lambda: LoRACL(backbone, targets=["net.0"], adapter="pissa", subspace="inflora"), "designed A .* pissa"),
        (lambda: LoRACL(backbone, targets=["net.0"], adapter="vera", grow_every=2, rank_budget=9), "rank growth .* vera"),
        (lambda: LAE(backbone, targets=["net.0"], adapter="lora_xs"), "learnable_scale .* lora_xs"),
        (lambda: MergeCL(backbone, targets=["net.0"], adapter="dora"), "low-rank task vector .* dora"),
    ]
    for build, message in cases:
        with pytest.raises(UserError, match=f"^strategy.adapter: [^\\n]*{message}[^\\n]*$"):
            build()
