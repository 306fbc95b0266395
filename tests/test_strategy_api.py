"""docs/strategy_api.md holds: the hooks run in the documented order, and its two examples run from YAML."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from clpeft.cli import main

ROOT = Path(__file__).resolve().parents[1]
DIGITS = {
    "seed": 0,
    "scenario": {"name": "class_incremental", "dataset": "sklearn_digits", "n_experiences": 5},
    "backbone": {"name": "mlp", "hidden": [64]},
    "train": {"epochs": 2, "batch_size": 32, "lr": 0.05},
    "logging": {"tensorboard": False, "progress": "never"},
}

RECORDER = """
from clpeft import Strategy

CALLS = []


class Recorder(Strategy):
    def before_experience(self, exp):
        CALLS.append(("before_experience", exp.index)); super().before_experience(exp)
    def train_data(self, exp):
        CALLS.append(("train_data", exp.index)); return super().train_data(exp)
    def param_groups(self, lr):
        CALLS.append(("param_groups",)); return super().param_groups(lr)
    def before_epoch(self, exp, epoch):
        CALLS.append(("before_epoch", exp.index, epoch))
    def training_step(self, batch):
        CALLS.append(("training_step", tuple(batch.index.tolist()))); return super().training_step(batch)
    def after_backward(self):
        CALLS.append(("after_backward", all(p.grad is not None for p in self.head.parameters())))
    def after_training_step(self):
        CALLS.append(("after_training_step",)); return False
    def after_epoch(self, exp, epoch):
        CALLS.append(("after_epoch", exp.index, epoch))
    def after_experience(self, exp):
        CALLS.append(("after_experience", exp.index))
    def before_evaluation(self, exp):
        CALLS.append(("before_evaluation", exp.index))
    def after_evaluation(self, exp, row):
        CALLS.append(("after_evaluation", exp.index, len(row)))
"""


def _run(tmp_path, name, strategy, eval=None, **train) -> dict:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump({**DIGITS, "strategy": strategy, "train": {**DIGITS["train"], **train}, "eval": eval or {}}))
    assert main(["run", str(path), "--out", str(tmp_path / name), "--device", "cpu"]) == 0
    return json.loads((tmp_path / name / "metrics.json").read_text())


def test_hooks_run_in_the_documented_order(tmp_path):
    import sys

    (tmp_path / "recorder.py").write_text(RECORDER)
    _run(
        tmp_path, "rec", {"name": str(tmp_path / "recorder.py") + ":Recorder"}, eval={"baseline": False}, epochs=2, batch_size=200
    )  # no baseline: its copy of the strategy would record too
    module = next(m for m in sys.modules.values() if getattr(m, "__file__", None) == str(tmp_path / "recorder.py"))
    calls = module.CALLS
    first = calls[: calls.index(("before_experience", 1))]
    names = [c[0] for c in first]
    steps = names.count("training_step")
    assert names[:4] == ["before_experience", "train_data", "param_groups", "before_epoch"]
    assert names[-4:] == ["after_epoch", "after_experience", "before_evaluation", "after_evaluation"]
    assert steps == names.count("after_backward") == names.count("after_training_step") > 0
    assert all(c[1] for c in first if c[0] == "after_backward")  # gradients are there
    body = names[4:-4]
    assert body == (
        ["training_step", "after_backward", "after_training_step"] * (steps // 2)
        + ["after_epoch", "before_epoch"]
        + ["training_step", "after_backward", "after_training_step"] * (steps // 2)
    )
    indices = [i for c in first if c[0] == "training_step" for i in c[1]]
    n_train = len(indices) // 2
    assert sorted(indices[:n_train]) == list(range(n_train))  # batch.index: every position of train_data once per epoch
    assert ("after_evaluation", 0, 5) in calls  # the row covers every experience


def test_the_docs_page_lists_every_hook():
    from clpeft.strategy import EVENT_HOOKS as HOOKS

    page = (ROOT / "docs" / "strategy_api.md").read_text()
    table = set(re.findall(r"^\| `(\w+)` \|", page, re.M))
    assert HOOKS <= table


def test_er_ace_example_runs_from_yaml_and_forgets_far_less_than_finetune(tmp_path):
    er_ace = _run(tmp_path, "er_ace", {"name": str(ROOT / "docs/examples/er_ace.py") + ":ERACE", "mem_size": 200})
    finetune = _run(tmp_path, "finetune", {"name": "finetune"})
    assert er_ace["metrics"]["acc_last"] > finetune["metrics"]["acc_last"] + 0.4
    assert er_ace["metrics"]["forgetting"] < finetune["metrics"]["forgetting"] - 0.5


def test_gdumb_example_trains_on_its_memory_alone_from_the_initial_weights(tmp_path, monkeypatch):
    from clpeft.strategy import Strategy

    sizes, starts = [], {}
    original = Strategy.training_step

    def spy(self, batch):
        sizes.append(len(batch.y))
        starts.setdefault(
            self.head, [p.detach().clone() for p in self.backbone.parameters()]
        )  # each head's first step (the key keeps it alive: no reused id)
        return original(self, batch)

    monkeypatch.setattr(Strategy, "training_step", spy)
    result = _run(
        tmp_path,
        "gdumb",
        {"name": str(ROOT / "docs/examples/gdumb.py") + ":GDumb", "mem_size": 100},
        eval={"baseline": False},
        epochs=20,
        batch_size=50,
    )
    assert sizes == [50] * (2 * 20 * 5)  # every experience: the 100 stored samples, never the experience's own data
    first, *later = starts.values()
    assert len(later) == 4 and all(all(a.equal(b) for a, b in zip(first, w)) for w in later)  # the initial weights
    assert result["metrics"]["acc_last"] > 0.5


def test_a_query_strategy_without_a_query_argument_is_refused_at_definition():
    """Issue 21: the engine calls ``predict(x, query=...)`` for ``needs_query`` strategies; the contract says so."""
    from clpeft import Strategy

    with pytest.raises(TypeError, match="sets needs_query, so the engine calls predict"):

        class Forgetful(Strategy):  # noqa: F841
            needs_query = True

            def predict(self, x):
                return x

    class Fine(Strategy):
        needs_query = True

        def predict(self, x, query=None):
            return x

    assert Fine.needs_query


def test_the_former_name_of_cache_features_is_refused_naming_the_new_one():
    """Issue 21: ``frozen_features`` read as "the backbone is frozen"; it means "may the engine cache features"."""
    from clpeft import Strategy

    with pytest.raises(TypeError, match=r"^Old sets frozen_features, which is now called cache_features; rename it$"):

        class Old(Strategy):  # noqa: F841
            frozen_features = False

    class New(Strategy):
        cache_features = False

    assert New.cache_features is False and Strategy.cache_features is None


def test_a_query_strategy_reads_raw_inputs_even_on_a_frozen_backbone():
    """``needs_query`` batches hold raw ``x`` (the query is the cached features): it implies ``cache_features = False``."""
    from clpeft import Strategy
    from clpeft.backbones.mlp import MLPBackbone

    class Prompted(Strategy):
        needs_query = True

        def predict(self, x, query=None):
            return x

    backbone = MLPBackbone((8, 8), hidden=[16])
    backbone.freeze()
    assert not Prompted(backbone).uses_features and Strategy(backbone).uses_features
    with pytest.raises(TypeError, match="sets needs_query, so its batches hold raw inputs; drop cache_features = True"):

        class Contradictory(Strategy):  # noqa: F841
            needs_query = True
            cache_features = True

            def predict(self, x, query=None):
                return x
