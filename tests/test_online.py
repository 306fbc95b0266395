"""Online continual learning (issue 20 item 4): one pass, anytime accuracy and A_auc, task-free
chunks, the i-Blurry split, exact resume mid-stream."""

from __future__ import annotations

import json
import textwrap

import numpy as np
import pytest
import torch

from clpeft import config, metrics
from clpeft.engine import Engine
from clpeft.errors import UserError
from clpeft.online import plan_online
from clpeft.scenarios.class_incremental import ClassIncremental
from clpeft.scenarios.online import Blurry

SPY = textwrap.dedent('''
    from clpeft import Strategy
    from clpeft.strategies.replay import Replay

    class Spy(Strategy):
        """Records the dataset index of every sample trained on and every hook call with its stream position."""

        def __init__(self, backbone):
            super().__init__(backbone)
            self.trained, self.calls, self.position = [], [], 0

        def before_experience(self, exp):
            super().before_experience(exp)
            self.current = exp
            self.calls.append(("before_experience", self.position, list(exp.classes_seen_so_far), exp.test is None,
                               len(exp.train)))

        def training_step(self, batch):
            self.trained += self.current.train.parts[0][1][batch.index].tolist()
            return super().training_step(batch)

        def after_experience(self, exp):
            self.position += len(exp.train)
            self.calls.append(("after_experience", self.position))

        def before_evaluation(self, exp):
            self.calls.append(("before_evaluation", self.position))

    class Crashing(Replay):
        """Replay that fails at a chosen training step of a chosen unit (a run killed mid-stream)."""

        def __init__(self, backbone, crash_at: list[int] | None = None, mem_size: int = 100):
            super().__init__(backbone, mem_size=mem_size)
            self.crash_at, self.unit, self.steps = crash_at, -1, 0

        def before_experience(self, exp):
            super().before_experience(exp)
            self.unit, self.steps = exp.index, 0

        def training_step(self, batch):
            self.steps += 1
            if self.crash_at == [self.unit, self.steps]:
                raise KeyboardInterrupt("killed mid-stream")
            return super().training_step(batch)
''')


def _online(digits_run, **scenario):
    digits_run["scenario"].update(online=True, eval_every=100, **scenario)
    digits_run["train"].update(epochs=1, batch_size=10)
    return digits_run


def _engine(cfg_dict, out, **kw):
    return Engine(config.resolve(cfg_dict), out, device="cpu", **kw)


@pytest.fixture
def spy_file(tmp_path, monkeypatch):
    (tmp_path / "spy.py").write_text(SPY)
    monkeypatch.chdir(tmp_path)
    return "spy.py"


def _run_spy(digits_run, tmp_path, name="run"):
    engine = _engine(digits_run, tmp_path / name)
    built = engine.build()
    result = engine.run(built)
    return built, result


# ----------------------------------------------------------------------------- metrics


def test_area_under_accuracy_is_the_hand_computed_sum():
    # evenly spaced points: sum_i f(i dn) dn / (K dn) = the mean, as i-Blurry's main.py reports
    assert metrics.area_under_accuracy([100, 200, 300], [0.5, 0.7, 0.9]) == pytest.approx((50 + 70 + 90) / 300)
    # uneven points weigh each accuracy by the samples since the previous point
    assert metrics.area_under_accuracy([50, 200], [0.2, 0.8]) == pytest.approx((0.2 * 50 + 0.8 * 150) / 200)
    assert metrics.area_under_accuracy([], []) is None
    with pytest.raises(ValueError):
        metrics.area_under_accuracy([100, 100], [0.5, 0.5])
    assert "a_auc" in metrics.scalar_metric_names("class_incremental", online=True)


def test_run_reports_the_anytime_curve_and_its_area(tmp_path, digits_run):
    engine = _engine(_online(digits_run), tmp_path / "run")
    built = engine.build()
    result = engine.run(built)
    m = result["metrics"]
    samples, accuracy = zip(*m["anytime_curve"])
    n = m["stream_samples"]
    assert list(samples) == list(range(100, n + 1, 100))
    assert m["a_auc"] == pytest.approx(float(np.mean(accuracy)))  # hand computation: dn = 100 throughout
    assert m["samples_per_s"] > 0 and 0 <= m["acc_anytime_last"] <= 1
    R = np.array(result["acc_matrix"])
    assert R.shape == (5, 5)  # the experience-end rows still fill the matrix
    assert m["acc_final"] == pytest.approx(R[-1].mean())
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["metrics"]["a_auc"] == m["a_auc"]
    # the first point scores the classes seen in the first 100 samples only: experience 0's two classes
    plan = plan_online(built.stream, built.scenario.online, 10)
    assert sorted(plan.seen_test(100).targets.unique().tolist()) == [0, 1]
    assert len(plan.seen_test(100)) == len(built.stream[0].test)


def test_evaluating_more_often_does_not_change_training(tmp_path, digits_run):
    digits_run["strategy"] = {"name": "replay", "mem_size": 100}
    digits_run["backbone"] = {"name": "cnn", "widths": [8, 16]}  # BatchNorm: the train mode must come back
    sparse = _engine(_online(digits_run, train_per_class=60), tmp_path / "sparse").run()
    digits_run["scenario"]["eval_every"] = 30
    dense = _engine(digits_run, tmp_path / "dense").run()
    assert dense["acc_matrix"] == sparse["acc_matrix"]
    assert len(dense["metrics"]["anytime_curve"]) > 3 * len(sparse["metrics"]["anytime_curve"])


def test_online_replay_forgets_less_than_online_finetune(tmp_path, digits_run):
    finetune = _engine(_online(digits_run), tmp_path / "ft").run()["metrics"]
    digits_run["strategy"] = {"name": "replay", "mem_size": 200}
    replay = _engine(digits_run, tmp_path / "er").run()["metrics"]
    assert replay["forgetting"] < finetune["forgetting"] - 0.3
    assert replay["a_auc"] > finetune["a_auc"] + 0.1


def test_more_than_one_epoch_and_orphan_online_keys_are_refused(tmp_path, digits_run):
    cfg = _online(digits_run)
    cfg["train"]["epochs"] = 2
    with pytest.raises(UserError, match="train.epochs: 1"):
        _engine(cfg, tmp_path / "run").check()
    digits_run["scenario"] = {"name": "class_incremental", "dataset": "sklearn_digits", "n_experiences": 5, "task_free": True}
    with pytest.raises(UserError, match="scenario.online: true"):
        config.resolve(digits_run)


# ----------------------------------------------------------------------------- one pass, task-free


@pytest.mark.parametrize(
    "scenario", [{}, {"task_free": True, "blurry": {"disjoint": 50, "blurry": 10}}], ids=["task-aware", "task-free-blurry"]
)
def test_every_stream_sample_is_trained_on_exactly_once(tmp_path, digits_run, spy_file, scenario):
    digits_run["strategy"] = {"name": "spy.py:Spy"}
    built, _ = _run_spy(_online(digits_run, **scenario), tmp_path)
    stream = [i for e in built.stream for i in e.train.parts[0][1].tolist()]
    assert len(built.strategy.trained) == len(stream)
    assert sorted(built.strategy.trained) == sorted(stream)  # each index once: no repeat, none left out


def test_task_free_strategy_sees_chunks_not_experiences(tmp_path, digits_run, spy_file):
    digits_run["strategy"] = {"name": "spy.py:Spy"}
    built, result = _run_spy(_online(digits_run, task_free=True, blurry={"disjoint": 50, "blurry": 10}), tmp_path)
    labels = torch.cat([e.train.targets for e in built.stream]).tolist()
    first = {}
    for p, c in enumerate(labels):
        first.setdefault(c, p)
    task_ends = np.cumsum([len(e.train) for e in built.stream]).tolist()
    calls = built.strategy.calls
    starts = [c for c in calls if c[0] == "before_experience"]
    assert len(starts) > len(built.stream)
    for _, position, seen, no_test, length in starts:
        assert no_test  # the test data stays with the engine
        # a chunk starts at an evaluation point or at a batch (of 10, from the chunk's start) holding a new class ...
        assert position % 100 == 0 or any(position <= p < position + 10 for p in first.values()), position
        # ... holds no other new class, and announces exactly the classes seen up to its end
        assert not any(position + 10 <= p < position + length for p in first.values())
        assert seen == sorted(c for c, p in first.items() if p < position + length)
    boundaries = {c[1] for c in starts}
    hidden = [end for end in task_ends[:-1] if end % 100 and not any(end <= p < end + 10 for p in first.values())]
    assert hidden and not boundaries & set(hidden)  # experience ends are not announced
    assert not [c for c in calls if c[0] == "before_evaluation"]
    assert len(result["acc_matrix"]) == 5


@pytest.mark.parametrize("plugin,floor", [("er_ace.py:ERACE", 0.5), ("gdumb.py:GDumb", 0.4)])
def test_documented_plug_ins_run_on_a_task_free_blurry_stream(tmp_path, digits_run, plugin, floor):
    from pathlib import Path

    examples = Path(__file__).resolve().parents[1] / "docs" / "examples"
    digits_run["strategy"] = {"name": f"{examples}/{plugin}", "mem_size": 200}
    result = _engine(_online(digits_run, task_free=True, blurry={"disjoint": 50, "blurry": 10}), tmp_path / "run").run()
    assert len(result["acc_matrix"]) == 5 and result["metrics"]["a_auc"] > floor  # finetune: 0.23


def test_domain_incremental_streams_run_online(tmp_path, digits_run):
    digits_run["scenario"] = {
        "name": "domain_incremental",
        "dataset": "sklearn_digits",
        "domains": [{}, {"rotation": 90}],
        "online": True,
        "eval_every": 200,
        "task_free": True,
    }
    digits_run["train"].update(epochs=1, batch_size=10)
    result = _engine(digits_run, tmp_path / "run").run()
    samples = [n for n, _ in result["metrics"]["anytime_curve"]]
    assert len(result["acc_matrix"]) == 2 and samples == list(range(200, result["metrics"]["stream_samples"] + 1, 200))
    digits_run["scenario"]["blurry"] = {"disjoint": 50, "blurry": 10}
    with pytest.raises(UserError, match="blurry"):
        config.resolve(digits_run)


# ----------------------------------------------------------------------------- the i-Blurry split


def test_blurry_split_proportions_follow_the_definition():
    def build(seed):
        scenario = ClassIncremental(seed, "sklearn_digits", 5, online=True, blurry=Blurry(disjoint=40, blurry=20))
        return scenario.experiences()

    stream = build(3)
    major = {c: e.index for e in stream for c in e.test.targets.unique().tolist()}
    assert sorted(len(set(e.test.targets.tolist())) for e in stream) == [2] * 5  # the columns: 2 classes each
    outside, total = {c: 0 for c in major}, {c: 0 for c in major}
    for e in stream:
        for c in e.train.targets.tolist():
            total[c] += 1
            outside[c] += major[c] != e.index
    disjoint = [c for c in major if outside[c] == 0]
    assert len(disjoint) == round(0.4 * 10)  # N = 40% of the classes stay in their experience
    for c in major:
        if c not in disjoint:
            assert outside[c] == round(0.2 * total[c])  # M = 20% of each blurry class's samples move
    labels = torch.cat([e.train.targets for e in stream]).tolist()
    assert list(dict.fromkeys(labels)) == list(range(10))  # labels numbered in order of first appearance
    again = build(3)
    assert all(torch.equal(a.train.parts[0][1], b.train.parts[0][1]) for a, b in zip(stream, again))
    other = build(4)
    assert not all(torch.equal(a.train.parts[0][1], b.train.parts[0][1]) for a, b in zip(stream, other))


# ----------------------------------------------------------------------------- resume


@pytest.mark.parametrize("task_free", [False, True], ids=["task-aware", "task-free"])
def test_resume_mid_stream_gives_the_same_results(tmp_path, digits_run, spy_file, task_free):
    digits_run["strategy"] = {"name": "spy.py:Crashing"}
    cfg = _online(digits_run, task_free=task_free)
    reference = _engine(cfg, tmp_path / "ref").run()
    crash = {**cfg, "strategy": {"name": "spy.py:Crashing", "crash_at": [3, 4]}}
    with pytest.raises(KeyboardInterrupt):
        _engine(crash, tmp_path / "killed").run()
    assert not (tmp_path / "killed" / "metrics.json").exists()
    assert (tmp_path / "killed" / "checkpoints" / "exp_002.pt").exists()  # units 0..2 done, killed inside unit 3
    resumed = _engine(cfg, tmp_path / "killed", resume=True, force=True).run()
    assert resumed["acc_matrix"] == reference["acc_matrix"]
    drop = ("samples_per_s",)
    assert {k: v for k, v in resumed["metrics"].items() if k not in drop} == {
        k: v for k, v in reference["metrics"].items() if k not in drop
    }


@pytest.mark.parametrize("name,floor", [("er_ace", 0.5), ("derpp", 0.4), ("gdumb", 0.4)])
def test_built_in_replay_methods_run_on_a_task_free_blurry_stream(tmp_path, digits_run, name, floor):
    """Issue 20's online protocol with the built-in ER-ACE, DER++ and GDumb (finetune: A_auc 0.23)."""
    digits_run["strategy"] = {"name": name, "mem_size": 200}
    result = _engine(_online(digits_run, task_free=True, blurry={"disjoint": 50, "blurry": 10}), tmp_path / "run").run()
    assert len(result["acc_matrix"]) == 5 and result["metrics"]["a_auc"] > floor
