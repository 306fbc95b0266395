"""Tests for the LoRA-based continual learners (lora_cl, lae) and continual merging (merge_cl).

Every test runs a real (tiny) stream through the engine -- scikit-learn digits, 5 experiences of
2 classes, an MLP backbone whose ``nn.Linear`` layers (``net.0``, ``net.2``) carry the LoRA
updates -- and spies on the strategy's hooks to compare what it did with an independent
computation: bitwise snapshots of what must not change, a float64 EMA recursion, D'Hondt's
quotient table, a hand-written task-arithmetic sum, a separate call of ``clpeft.merging.merge``.
"""

from __future__ import annotations

import copy
import functools
import io

import numpy as np
import pytest
import torch

import clpeft.config
import clpeft.engine
from clpeft.components.lora.rank_allocation import RankAllocator
from clpeft.errors import UserError
from clpeft.merging import LoraAdapter, merge
from clpeft.strategies.lae import LAE
from clpeft.strategies.lora_cl import LoRACL
from clpeft.strategies.merge_cl import MergeCL

TARGETS = ["net.0", "net.2"]


def _config(tmp_path, strategy: dict, epochs: int = 2, hidden: tuple[int, ...] = (32, 16)) -> dict:
    return {
        "seed": 0,
        "scenario": {
            "name": "class_incremental",
            "dataset": "sklearn_digits",
            "n_experiences": 5,
            "train_per_class": 24,
            "test_per_class": 10,
            "root": str(tmp_path / "data"),
        },
        "backbone": {"name": "mlp", "hidden": list(hidden)},
        "strategy": strategy,
        "train": {"epochs": epochs, "batch_size": 16, "lr": 0.01, "optimizer": "adam"},
        "eval": {"batch_size": 256, "baseline": False},
        "logging": {"tensorboard": False, "progress": "never"},
    }


def _run(tmp_path, run_keeping, strategy: dict, **kw):
    """Run the stream; returns (metrics.json content, the trained strategy, the stream)."""
    return run_keeping(_config(tmp_path, strategy, **kw), tmp_path / f"run-{strategy['name']}")


def _test_inputs(stream) -> torch.Tensor:
    return torch.cat([e.test.load()[0] for e in stream])


# --------------------------------------------------------------------------------------------
# lora_cl
# --------------------------------------------------------------------------------------------


def test_lora_cl_trains_only_the_current_update_and_the_head(tmp_path, monkeypatch, run_keeping):
    trained, frozen_after, groups = [], [], []
    after, param_groups = LoRACL.after_experience, LoRACL.param_groups

    def spy_groups(self, lr):
        if not base:  # before any training: the pretrained weights
            base.update({n: p.detach().clone() for n, p in self.backbone.named_parameters()})
        out = param_groups(self, lr)
        current = {id(p) for layer in self.lora.values() for p in (layer.lora_A, layer.lora_B)}
        groups.append(({id(p) for g in out for p in g["params"]}, current | {id(p) for p in self.head.parameters()}))
        return out

    def spy_after(self, exp):
        trained.append({n: (m.lora_A.detach().clone(), m.lora_B.detach().clone()) for n, m in self.lora.items()})
        after(self, exp)
        frozen_after.append({n: (m.frozen_A.clone(), m.frozen_B.clone()) for n, m in self.lora.items()})

    base = {}
    monkeypatch.setattr(LoRACL, "param_groups", spy_groups)
    monkeypatch.setattr(LoRACL, "after_experience", spy_after)
    _, strategy, _ = _run(tmp_path, run_keeping, {"name": "lora_cl", "targets": TARGETS, "rank": 3, "alpha": 6.0})

    assert len(groups) == 5 and all(got == want for got, want in groups)  # only A_t, B_t and the head
    for name, layer in strategy.lora.items():  # the base weights never move
        assert torch.equal(layer.base_layer.weight, base[f"{name}.base_layer.weight"])
        assert torch.equal(layer.base_layer.bias, base[f"{name}.base_layer.bias"])
    for t in range(5):
        for name in TARGETS:
            a, b = trained[t][name]
            assert bool(b.abs().sum() > 0)  # the update was trained
            for later in frozen_after[t:]:  # frozen as trained, and bitwise unchanged afterwards
                assert torch.equal(later[name][0][3 * t : 3 * t + 3], a)
                assert torch.equal(later[name][1][:, 3 * t : 3 * t + 3], b)
    assert all(m.frozen_rank == 15 for m in strategy.lora.values())


def test_lora_cl_inflora_trains_only_b_and_spares_earlier_inputs(tmp_path, monkeypatch, run_keeping):
    """InfLoRA: A_t is designed before the experience and never trained (only B_t and the head are
    optimised), and the later updates' output on the first experience's inputs is a small fraction
    of what unconstrained updates produce (first layer: its inputs are the raw images, so they are
    the same in both runs).

    Both growth rules of the subspace: GPM's (``subspace: gpm``, eigenvalues of the covariance) at
    0.99, and the official one (``inflora``, their squares) at 0.999: squaring concentrates the
    energy in the leading directions, so the official rule needs the higher threshold to protect
    as much of these raw-pixel inputs."""
    groups = []
    param_groups = LoRACL.param_groups

    def spy_groups(self, lr):
        out = param_groups(self, lr)
        trainable = {id(p) for g in out for p in g["params"]}
        groups.append((trainable, {id(m.lora_B) for m in self.lora.values()} | {id(p) for p in self.head.parameters()}))
        return out

    monkeypatch.setattr(LoRACL, "param_groups", spy_groups)
    interference = {}
    for subspace, threshold in (("none", 0.99), ("gpm", 0.99), ("inflora", 0.999)):
        _, strategy, stream = _run(
            tmp_path / subspace,
            run_keeping,
            {"name": "lora_cl", "targets": ["net.0"], "rank": 3, "subspace": subspace, "subspace_threshold": threshold},
            epochs=3,
            hidden=(64,),
        )
        layer = strategy.lora["net.0"]
        seen = []
        handle = layer.register_forward_pre_hook(lambda _m, args: seen.append(args[0].detach().double()))
        with torch.no_grad():
            strategy.backbone(stream[0].train.load()[0])
        handle.remove()
        x = seen[0]
        a, b, s = layer.frozen_A.double(), layer.frozen_B.double(), layer.frozen_scaling.double()
        first = ((x @ a[:3].T) * s[:3]) @ b[:, :3].T
        later = ((x @ a[3:].T) * s[3:]) @ b[:, 3:].T
        interference[subspace] = float(later.square().sum() / first.square().sum())
    assert all(got == want for got, want in groups[5:])  # the gpm and inflora runs: only B_t and the head train
    assert interference["gpm"] < 0.1 * interference["none"], interference
    assert interference["inflora"] < 0.1 * interference["none"], interference


def test_lora_cl_inflora_threshold_schedule_runs_over_the_stream(tmp_path, monkeypatch, run_keeping):
    """``subspace_threshold: [lamb, lame]``: after experience t of T the basis grows to lamb + (lame - lamb) t / T."""
    from clpeft.components.lora.input_subspace import InputSubspace

    progress, extend = [], InputSubspace.extend

    def spy_extend(self, covariances, progress_=0.0):
        progress.append(progress_)
        return extend(self, covariances, progress_)

    monkeypatch.setattr(InputSubspace, "extend", spy_extend)
    _run(
        tmp_path,
        run_keeping,
        {"name": "lora_cl", "targets": ["net.0"], "rank": 2, "subspace": "inflora", "subspace_threshold": [0.9, 1.0]},
        epochs=1,
    )
    assert progress == [0.0, 0.2, 0.4, 0.6, 0.8]


def test_lora_cl_merge_mode_equals_base_plus_the_sum_of_the_updates(tmp_path, monkeypatch, run_keeping):
    deltas, base = [], {}
    after = LoRACL.after_experience

    def spy_after(self, exp):
        if not base:  # nothing merged yet: the pretrained weights
            base.update({n: m.base_layer.weight.detach().double().clone() for n, m in self.lora.items()})
        deltas.append({n: m.delta_weight().detach().double() for n, m in self.lora.items()})
        after(self, exp)
        assert all(m.frozen_rank == 0 for m in self.lora.values())

    monkeypatch.setattr(LoRACL, "after_experience", spy_after)
    _, strategy, _ = _run(tmp_path, run_keeping, {"name": "lora_cl", "targets": TARGETS, "rank": 3, "old_updates": "merge"})

    for name, layer in strategy.lora.items():
        expected = base[name] + sum(d[name] for d in deltas)
        assert (expected - base[name]).abs().max() > 1e-2
        torch.testing.assert_close(layer.base_layer.weight.double(), expected, rtol=0, atol=1e-6)


def _dhondt(scores: dict[str, float], caps: dict[str, int], budget: int) -> dict[str, int]:
    """D'Hondt by its quotient table: the ``budget`` largest of score/d, d = 1..cap (ties: layer order)."""
    names = list(scores)
    table = [(-scores[n] / d, names.index(n), d, n) for n in names for d in range(1, caps[n] + 1)]
    given = dict.fromkeys(names, 0)
    for *_, n in sorted(table)[:budget]:
        given[n] += 1
    return given


def _prilora_importance(a: torch.Tensor, b: torch.Tensor, sq_mean: torch.Tensor) -> np.ndarray:
    a, b, rms = a.double().numpy(), b.double().numpy(), np.sqrt(sq_mean.double().numpy())
    return np.linalg.norm(b, axis=0) * np.linalg.norm(a * rms, axis=1)


def test_lora_cl_ranks_follow_the_schedule_and_the_budget_allocation(tmp_path, monkeypatch, run_keeping):
    budget = 5
    records, starts = [], []
    split, before = RankAllocator.split, LoRACL.before_experience

    def spy_before(self, exp):
        before(self, exp)
        starts.append([m.rank for m in self.lora.values()])

    def spy_split(self, b):
        state = {
            n: (m.lora_A.detach().clone(), m.lora_B.detach().clone(), m.input_sq_mean.clone(), m.frozen_rank)
            for n, m in self.layers.items()
        }
        out = split(self, b)
        records.append({"scores": self.scores(), "caps": {n: m.rank for n, m in self.layers.items()}, "state": state, "split": out})
        return out

    monkeypatch.setattr(RankAllocator, "split", spy_split)
    monkeypatch.setattr(LoRACL, "before_experience", spy_before)
    _, strategy, _ = _run(
        tmp_path,
        run_keeping,
        {
            "name": "lora_cl",
            "targets": TARGETS,
            "rank": 2,
            "max_rank": 6,
            "rank_schedule": "linear",
            "rank_budget": budget,
        },
    )

    assert starts == [[2, 6]] * 5  # PRILoRA: rank grows linearly with depth (net.0 -> 2, net.2 -> 6)
    assert len(records) == 5
    for rec in records:
        assert all(s > 0 for s in rec["scores"].values())
        expected = _dhondt(rec["scores"], rec["caps"], budget)
        assert rec["split"] == expected and sum(expected.values()) == budget
    assert any(rec["split"]["net.0"] not in (0, 2) for rec in records) or any(
        rec["split"]["net.2"] not in (0, 6) for rec in records
    )  # a real split, not all-or-nothing
    for name, layer in strategy.lora.items():
        offset = 0
        for rec in records:  # each experience froze its kept components: the most important ones
            a, b, sq_mean, frozen_before = rec["state"][name]
            assert frozen_before == offset
            keep = rec["split"][name]
            kept = np.sort(np.argsort(-_prilora_importance(a, b, sq_mean), kind="stable")[:keep])
            assert torch.equal(layer.frozen_A[offset : offset + keep], a[kept])
            assert torch.equal(layer.frozen_B[:, offset : offset + keep], b[:, kept])
            offset += keep
        assert layer.frozen_rank == offset
    assert sum(m.frozen_rank for m in strategy.lora.values()) == 5 * budget


def test_lora_cl_grows_the_highest_scoring_layer_on_increloras_schedule(tmp_path, monkeypatch, run_keeping):
    """Rank 1 per layer growing to a budget of 5, every 2 steps after 3 (12 steps per experience).

    Growth happens in the middle of an experience, with the same optimizer: the grown components
    must train (their ``B`` columns leave zero) and the model's output must not jump at a growth.
    """
    every, warmup, budget = 2, 3, 5
    events, allocate = [], RankAllocator.allocate

    def spy_allocate(self, generator):
        x = torch.randn(8, 64, generator=torch.Generator().manual_seed(len(events)))
        scores = self.scores()
        before = strategy_of[0].predict(x)
        grown = allocate(self, generator)
        events.append({"scores": scores, "grown": grown, "jump": (strategy_of[0].predict(x) - before).abs().max().item()})
        return grown

    strategy_of = []
    init = LoRACL.__init__

    @functools.wraps(init)  # keeps the signature the config reads the parameters from
    def spy_init(self, *args, **kwargs):
        init(self, *args, **kwargs)
        strategy_of.append(self)

    steps_seen = []
    hook = LoRACL.after_training_step

    def spy_hook(self):
        changed = hook(self)
        steps_seen.append((self.step, changed, sum(m.rank for m in self.lora.values())))
        return changed

    monkeypatch.setattr(RankAllocator, "allocate", spy_allocate)
    monkeypatch.setattr(LoRACL, "__init__", spy_init)
    monkeypatch.setattr(LoRACL, "after_training_step", spy_hook)
    _, strategy, _ = _run(
        tmp_path,
        run_keeping,
        {
            "name": "lora_cl",
            "targets": TARGETS,
            "rank": 1,
            "rank_budget": budget,
            "grow_every": every,
            "grow_warmup": warmup,
        },
        epochs=4,
    )

    per_experience = 4 * 3  # 48 samples in batches of 16, 4 epochs
    assert len(steps_seen) == 5 * per_experience
    for i in range(5):
        exp_steps = steps_seen[i * per_experience : (i + 1) * per_experience]
        assert [s for s, _, _ in exp_steps] == list(range(1, per_experience + 1))
        grew_at = [s for s, changed, _ in exp_steps if changed]
        assert grew_at == [4, 6, 8]  # step > warmup, step % every == 0, until the budget (2 + 3 = 5)
        assert exp_steps[-1][2] == budget
    assert len(events) == 5 * 5 and sum(bool(e["grown"]) for e in events) == 5 * 3  # steps 10, 12: budget spent
    for event in events:
        if event["grown"]:
            (name,) = event["grown"]
            assert event["scores"][name] == max(event["scores"].values())
        assert event["jump"] < 1e-6  # B's new columns are zero: growing leaves the output unchanged
    assert sum(m.frozen_rank for m in strategy.lora.values()) == 5 * budget  # five rank-5 updates, frozen
    for layer in strategy.lora.values():  # every component trained, the grown ones included
        assert (layer.frozen_B.abs().sum(0) > 0).all()


def test_lora_cl_eva_starts_every_update_at_the_experiences_input_components(tmp_path, monkeypatch, run_keeping):
    """``init: eva``: before each experience's training, every update's ``A`` is the top right-singular
    vectors of its layer's centred inputs over that experience's training data (signed so the largest
    entry is positive), ``B = 0``, the ranks redistributed by explained variance over the layers with
    their total kept; computed here by hand from hooked inputs."""
    starts, inputs = [], []
    before = LoRACL.before_experience

    def spy_before(self, exp):
        seen = {name: [] for name in self.lora}
        hooks = [layer.register_forward_pre_hook(lambda _, a, n=name: seen[n].append(a[0].detach())) for name, layer in self.lora.items()]
        try:
            before(self, exp)  # EVA's pass feeds the training data through the adapted layers
        finally:
            for hook in hooks:
                hook.remove()
        inputs.append({n: torch.cat(x).reshape(-1, x[0].shape[-1]).double() for n, x in seen.items()})
        starts.append({n: (m.lora_A.detach().clone(), m.lora_B.detach().clone()) for n, m in self.lora.items()})

    monkeypatch.setattr(LoRACL, "before_experience", spy_before)
    _, strategy, _ = _run(tmp_path, run_keeping, {"name": "lora_cl", "targets": TARGETS, "rank": 3, "alpha": 6.0, "init": "eva"})
    assert len(starts) == 5
    for t in range(5):
        ratios, components = {}, {}
        for name, x in inputs[t].items():
            centred = x - x.mean(0)
            _, s, vh = torch.linalg.svd(centred, full_matrices=False)
            vh = vh * torch.sign(vh.gather(1, vh.abs().argmax(1, keepdim=True)))
            components[name], ratios[name] = vh[:6], (s[:6] ** 2) / (s**2).sum()  # rho 2: up to 2 r per layer
        order = sorted(((r, n) for n, rs in ratios.items() for r in rs.tolist()), reverse=True)[:6]  # total rank 2 x 3
        ranks = {n: sum(1 for _, m in order if m == n) for n in ratios}
        for name, (a, b) in starts[t].items():
            assert a.shape[0] == ranks[name] and torch.count_nonzero(b) == 0
            torch.testing.assert_close(a.double(), components[name][: ranks[name]], rtol=1e-4, atol=1e-4)
    assert sum(m.frozen_rank for m in strategy.lora.values()) == 5 * 6  # each experience kept the total rank


def test_lora_cl_eva_refuses_what_it_cannot_start():
    from clpeft.backbones.mlp import MLPBackbone

    with pytest.raises(
        UserError, match=r"strategy.init: init: eva starts A from the inputs' singular vectors, but InfLoRA designs A itself"
    ):
        LoRACL(MLPBackbone((8, 8), hidden=[16]), targets=["net.0"], init="eva", subspace="inflora")
    with pytest.raises(UserError, match=r"strategy.init: init: eva starts lora and dora updates, not vera"):
        LoRACL(MLPBackbone((8, 8), hidden=[16]), targets=["net.0"], init="eva", adapter="vera")


def test_lora_cl_config_errors_name_the_key():
    from clpeft.backbones.mlp import MLPBackbone

    with pytest.raises(UserError, match="^strategy.targets: .*net.0"):
        LoRACL(MLPBackbone((8, 8), hidden=[16]))  # the default ViT targets are not in an MLP
    with pytest.raises(UserError, match="^strategy.max_rank"):
        LoRACL(MLPBackbone((8, 8), hidden=[16]), targets=["net.0"], rank_schedule="linear")
    with pytest.raises(UserError, match=r"^strategy.targets: .*ends with \['net.9'\]"):
        LoRACL(MLPBackbone((8, 8), hidden=[16, 16]), targets=["net.0", "net.9"])  # one typo among valid targets
    with pytest.raises(UserError, match="^strategy.rank_budget: grow_every needs rank_budget"):
        LoRACL(MLPBackbone((8, 8), hidden=[16]), targets=["net.0"], grow_every=5)
    with pytest.raises(UserError, match="^strategy.rank_budget: .*total rank 8 over 2 layers"):
        LoRACL(MLPBackbone((8, 8), hidden=[16, 16]), targets=["net.0", "net.2"], grow_every=5, rank_budget=8)
    with pytest.raises(UserError, match="^strategy.grow_every: .*InfLoRA"):
        LoRACL(MLPBackbone((8, 8), hidden=[16]), targets=["net.0"], grow_every=5, rank_budget=8, subspace="inflora")


# --------------------------------------------------------------------------------------------
# lae
# --------------------------------------------------------------------------------------------


def _online(self) -> dict[str, torch.Tensor]:
    """The online module: every adapted layer's factors and learnable scale."""
    return {
        f"{n}.{f}": getattr(m, f).detach().double().clone()
        for n, m in self.lora.items()
        for f in ("lora_A", "lora_B", "lora_scale")
        if getattr(m, f) is not None
    }


def test_lae_offline_module_is_the_ema_of_the_online_trajectory(tmp_path, monkeypatch, run_keeping):
    m, freeze_epochs = 0.8, 1
    trajectory: list[tuple[int, str, dict]] = []  # (experience, when, online factors)
    exp_index = {}
    step, after, before = LAE.training_step, LAE.after_experience, LAE.before_experience

    def spy_before(self, exp):
        exp_index["t"] = exp.index
        before(self, exp)

    def spy_step(self, batch):
        trajectory.append((exp_index["t"], "step", _online(self)))
        return step(self, batch)

    def spy_after(self, exp):
        trajectory.append((exp.index, "end", _online(self)))
        after(self, exp)

    monkeypatch.setattr(LAE, "before_experience", spy_before)
    monkeypatch.setattr(LAE, "training_step", spy_step)
    monkeypatch.setattr(LAE, "after_experience", spy_after)
    _, strategy, _ = _run(
        tmp_path,
        run_keeping,
        {
            "name": "lae",
            "targets": TARGETS,
            "rank": 3,
            "alpha": 3.0,
            "ema_momentum": m,
            "freeze_epochs": freeze_epochs,
        },
    )

    # theta_off = theta_on at the end of experience 0, then theta_off <- m theta_off + (1 - m) theta_on
    # after every optimizer step (the online factors at the start of the next step, or at the end)
    offline = next(o for t, when, o in trajectory if t == 0 and when == "end")
    for t in range(1, 5):
        points = [o for u, _, o in trajectory if u == t][1:]  # the first is before any step of t
        for online in points:
            offline = {k: m * offline[k] + (1 - m) * online[k] for k in offline}
    got = strategy.offline.model.overrides()
    for key, value in offline.items():
        torch.testing.assert_close(got[key].double(), value, rtol=0, atol=1e-6)
    final = trajectory[-1][2]
    assert max((got[k].double() - final[k]).abs().max() for k in final) > 1e-3  # not just a copy

    # calibration: during the first epoch of experiences >= 1 the online module does not move
    steps_per_epoch = -(-48 // 16)
    for t in range(1, 5):
        points = [o for u, when, o in trajectory if u == t]
        for o in points[1 : steps_per_epoch + 1]:
            assert all(torch.equal(o[k], points[0][k]) for k in o)
        assert any(not torch.equal(points[-1][k], points[0][k]) for k in o)  # ... and moves afterwards


def test_lae_prediction_is_the_max_of_the_two_softmaxes(tmp_path, run_keeping):
    _, strategy, stream = _run(tmp_path, run_keeping, {"name": "lae", "targets": TARGETS, "ema_momentum": 0.8, "freeze_epochs": 1})
    x = _test_inputs(stream)
    with torch.no_grad():
        online = strategy.head(strategy.backbone(x))
        off_model = copy.deepcopy(strategy.backbone)
        for key, value in strategy.offline.model.overrides().items():  # factors (and learnable scales)
            path, _, factor = key.rpartition(".")
            getattr(off_model.get_submodule(path), factor).copy_(value)
        offline = strategy.head(off_model(x))
        expected = np.maximum(torch.softmax(online, 1).numpy(), torch.softmax(offline, 1).numpy())
        got = strategy.predict(x).exp().numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-7)
    assert not np.allclose(torch.softmax(online, 1).numpy(), expected, atol=1e-3)  # the offline expert counts


# --------------------------------------------------------------------------------------------
# merge_cl
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "mode,method,params,start_from",
    [
        ("lora", "task_arithmetic", {"scale": 0.7}, "base"),
        ("lora", "ties", {"density": 0.5}, "merged"),
        ("full", "dare", {"drop_rate": 0.3}, "base"),
    ],
    ids=["lora-ta", "lora-ties-from-merged", "full-dare"],
)
def test_merge_cl_evaluates_the_merge_of_its_stored_task_vectors(tmp_path, mode, method, params, start_from, run_keeping):
    _, strategy, stream = _run(
        tmp_path,
        run_keeping,
        {
            "name": "merge_cl",
            "mode": mode,
            "method": method,
            "merge_params": params,
            "start_from": start_from,
            "targets": TARGETS,
            "rank": 3,
            "merge_seed": 5,
        },
    )
    assert len(strategy.finetuned) == 5
    models = [LoraAdapter.from_state_dict(v) for v in strategy.finetuned] if mode == "lora" else strategy.finetuned
    merged = merge(strategy.base, models, method, seed=5, **params)  # an independent call
    live = strategy._weights()
    assert set(live) == set(merged)
    for name, weight in live.items():
        assert torch.equal(weight.detach(), merged[name]), name
        assert (weight.detach() - strategy.base[name]).abs().max() > 1e-3  # merging moved it

    # the evaluated model is that backbone: a plain copy with the merged weights predicts the same
    fresh = copy.deepcopy(strategy.backbone)
    if mode == "lora":
        for layer in strategy.lora.values():
            assert torch.equal(layer.lora_B, torch.zeros_like(layer.lora_B))  # no LoRA path on top
    x = _test_inputs(stream)
    with torch.no_grad():
        assert torch.equal(strategy.predict(x), strategy.head(fresh(x)))


def test_merge_cl_task_arithmetic_of_lora_factors_by_hand(tmp_path, run_keeping):
    scale = 0.7
    _, strategy, _ = _run(
        tmp_path,
        run_keeping,
        {
            "name": "merge_cl",
            "mode": "lora",
            "merge_params": {"scale": scale},
            "targets": TARGETS,
            "rank": 3,
        },
    )
    for name, layer in strategy.lora.items():
        deltas = [
            (v[f"{name}.lora_alpha"].item() / 3) * (v[f"{name}.lora_B"].double() @ v[f"{name}.lora_A"].double()) for v in strategy.finetuned
        ]
        expected = strategy.base[f"{name}.weight"].double() + scale * sum(deltas)
        torch.testing.assert_close(layer.base_layer.weight.double(), expected, rtol=0, atol=1e-6)


def test_merge_cl_rejects_parameters_of_another_method():
    from clpeft.backbones.mlp import MLPBackbone

    with pytest.raises(UserError, match="^strategy.merge_params.density"):
        MergeCL(MLPBackbone((8, 8), hidden=[16]), mode="full", method="task_arithmetic", merge_params={"density": 0.2})
    with pytest.raises(UserError, match="^strategy.merge_params.weights"):
        MergeCL(MLPBackbone((8, 8), hidden=[16]), mode="full", merge_params={"weights": [1.0]})


# --------------------------------------------------------------------------------------------
# all three: less forgetting than finetune, exact state_dict round trips
# --------------------------------------------------------------------------------------------

METHODS = {
    "lora_cl": {"name": "lora_cl", "targets": TARGETS, "rank": 3, "rank_budget": 4},
    "lae": {"name": "lae", "targets": TARGETS, "ema_momentum": 0.8, "freeze_epochs": 1},
    "merge_cl": {"name": "merge_cl", "mode": "lora", "targets": TARGETS, "rank": 3},
}


def test_each_forgets_less_than_finetune(tmp_path, run_keeping):
    finetune, _, _ = _run(tmp_path, run_keeping, {"name": "finetune"}, epochs=3, hidden=(64,))
    base = finetune["metrics"]["forgetting"]
    assert base > 0.8  # the stream really is forgotten by plain fine-tuning
    for name, strategy in METHODS.items():
        result, _, _ = _run(tmp_path, run_keeping, {**strategy, "targets": ["net.0"]}, epochs=3, hidden=(64,))
        assert result["metrics"]["forgetting"] < base - 0.3, (name, result["metrics"]["forgetting"], base)


@pytest.mark.parametrize("name", list(METHODS))
def test_state_dict_round_trip_into_a_fresh_strategy_gives_identical_predictions(tmp_path, name, run_keeping):
    _, strategy, stream = _run(tmp_path, run_keeping, METHODS[name])
    buf = io.BytesIO()
    torch.save(strategy.state_dict(), buf)  # as a checkpoint does
    cfg = clpeft.config.resolve(_config(tmp_path, METHODS[name]))
    torch.manual_seed(123)  # a different random backbone: everything must come from the state dict
    backbone = cfg.backbone.cls(input_shape=tuple(stream[0].test.load()[0].shape[1:]), **cfg.backbone.params)
    fresh = cfg.strategy.cls(backbone, **cfg.strategy.params)
    fresh.load_state_dict(torch.load(io.BytesIO(buf.getvalue()), weights_only=False))
    strategy.eval(), fresh.eval()
    x = _test_inputs(stream)
    with torch.no_grad():
        assert torch.equal(fresh.predict(x), strategy.predict(x))


@pytest.mark.parametrize(
    "strategy",
    [
        {"name": "lora_cl", "targets": TARGETS, "rank": 1, "rank_budget": 5, "grow_every": 2},
        {"name": "lora_cl", "targets": TARGETS, "rank": 2, "subspace": "inflora", "subspace_threshold": [0.9, 1.0]},
        {"name": "lora_cl", "targets": TARGETS, "rank": 2, "init": "eva"},
    ],
    ids=["increlora-growth", "inflora-schedule", "eva-init"],
)
def test_lora_cl_interrupted_run_resumes_to_the_same_matrix(tmp_path, strategy, interrupted_then_resumed):
    """Grown frozen updates and GPM bases change shape from experience to experience; a resumed
    run must rebuild them from the checkpoint and continue exactly."""
    full, resumed = interrupted_then_resumed(_config(tmp_path, strategy), tmp_path)
    assert resumed == full
