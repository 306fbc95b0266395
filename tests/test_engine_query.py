"""Strategies that key on the frozen backbone's features get them from the cache (one pass per step)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from clpeft import Strategy, config
from clpeft.engine import Engine
from clpeft.errors import UserError


class QueryGated(Strategy):
    """A toy prompt-style method: a query from the frozen features gates the features of a second path."""

    needs_query = True
    cache_features = False
    checked = False

    def __init__(self, backbone):
        super().__init__(backbone)
        self.gate = torch.nn.Linear(backbone.feature_dim, backbone.feature_dim)

    def predict(self, x, query=None):
        if query is None:
            query = self.backbone(x).detach()  # the second pass the cache saves
        return self.head(self.backbone(x) * torch.sigmoid(self.gate(query)))

    def training_step(self, batch):
        if not QueryGated.checked:
            with torch.no_grad():
                assert torch.equal(batch.features, self.backbone(batch.x))
            QueryGated.checked = True
        return F.cross_entropy(self.predict(batch.x, query=batch.features), batch.y)


@pytest.fixture
def query_run(digits_run, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "query_gated_mod", sys.modules[__name__])
    digits_run["strategy"] = {"name": f"{__name__}:QueryGated"}
    digits_run["backbone"]["freeze"] = True
    digits_run["scenario"]["n_experiences"] = 2
    digits_run["eval"] = {"baseline": False}
    return digits_run


def test_one_backbone_pass_per_training_step(tmp_path, query_run):
    engine = Engine(config.resolve(query_run), tmp_path / "run", device="cpu")
    built = engine.build()
    stream, strategy = built.stream, built.strategy
    calls = []
    strategy.backbone.register_forward_hook(lambda *a: calls.append(1))
    result = engine.run(built)
    assert QueryGated.checked
    train_cfg = engine.cfg.train
    steps = sum(train_cfg.epochs * math.ceil(len(e.train) / train_cfg.batch_size) for e in stream)
    eval_batches = sum(len(stream) * math.ceil(len(e.test) / 256) for e in stream)
    cache_batches = sum(math.ceil(len(e.train) / 256) + math.ceil(len(e.test) / 256) for e in stream)
    check = 1  # the one pass QueryGated.training_step makes to compare batch.features
    assert len(calls) == steps + eval_batches + cache_batches + check  # not 2 * (steps + eval_batches)
    assert result["acc_matrix"][0][0] > 0.9


def test_query_methods_need_a_frozen_backbone(tmp_path, query_run):
    query_run["backbone"]["freeze"] = False
    with pytest.raises(UserError, match="backbone.freeze: strategy .* keys on the frozen backbone's features"):
        Engine(config.resolve(query_run), tmp_path / "run", device="cpu").run()
