"""lora_cl with ``adapter: adalora`` and AdaLoRA's schedule (``target_rank``) inside each experience.

A tiny stream through the engine (scikit-learn digits, 2 experiences of 5 classes, 80 training
samples each: 5 batches of 16 x 2 epochs = 10 optimizer steps; an MLP whose ``net.0`` and
``net.2`` carry rank-3 AdaLoRA updates): every experience runs its own schedule from its first
step (the kept singular values per step follow the warm-up, the fall and the final mask), the
loss carries ``gamma R(P, Q)``, each retired update keeps exactly ``target_rank`` per layer on
average, an interrupted run resumes to the same matrix, and the options a schedule cannot follow
are refused naming their key.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from digits_configs import digits_mlp_config

import clpeft.config
from clpeft.components.lora.adalora import orthogonal_penalty
from clpeft.errors import UserError
from clpeft.strategies.lora_cl import LoRACL

TARGETS = ["net.0", "net.2"]
SCHEDULE = {"target_rank": 1, "total_step": 10, "tinit": 2, "tfinal": 2, "delta_t": 2, "orth_reg_weight": 0.5}
STRATEGY = {"name": "lora_cl", "targets": TARGETS, "rank": 3, "adapter": "adalora", **SCHEDULE}


def _config(tmp_path, strategy: dict) -> dict:
    return digits_mlp_config(tmp_path, strategy, epochs=2, test_per_class=8)


def test_each_experience_runs_its_own_schedule(tmp_path, monkeypatch, run_keeping):
    kept, losses = [], []
    hook, step_loss = LoRACL.after_training_step, LoRACL.training_step

    def spy_hook(self):
        changed = hook(self)
        kept.append(sum(int(layer.lora_E.ne(0).sum()) for layer in self.lora.values()))
        return changed

    def spy_loss(self, batch):
        loss = step_loss(self, batch)
        task = self.aligned.loss(self.head(self.embed(batch.x)), batch.y)
        losses.append((loss.item(), task.item(), 0.5 * orthogonal_penalty(self.lora).item()))
        return loss

    monkeypatch.setattr(LoRACL, "after_training_step", spy_hook)
    monkeypatch.setattr(LoRACL, "training_step", spy_loss)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # each experience reaches its final mask: no short-schedule warning
        _, strategy, _ = run_keeping(_config(tmp_path, STRATEGY), tmp_path / "run")

    # 2 layers x rank 3 = 6 until t_i = 2; masks at even steps of the fall (b(4) = int(4 (4/6)^3 + 2) = 3,
    # b(6) = int(2.15) = 2), the final mask (2 = 2 x target_rank) at T - t_f = 8 and after; E is masked in place
    # after the optimizer step, so an odd step's optimizer update may revive a masked value until the final mask
    assert len(kept) == 20
    for schedule in (kept[:10], kept[10:]):  # the second experience starts over at the full budget
        assert schedule[:3] == [6, 6, 6] and schedule[3] == 3 and schedule[5] == 2 and schedule[7:] == [2, 2, 2]
    for loss, task, penalty in losses:
        assert penalty > 0 and loss == pytest.approx(task + penalty, rel=1e-6)
    for layer in strategy.lora.values():  # two retired updates, their masked triplets dropped
        assert layer.frozen_rank <= 2 * 2
    assert sum(layer.frozen_rank for layer in strategy.lora.values()) == 2 * 2  # 2 experiences x (2 layers x target 1)
    assert all(layer.rank == 3 for layer in strategy.lora.values())  # the next update starts at the full rank


def test_interrupted_run_resumes_to_the_same_matrix(tmp_path, interrupted_then_resumed):
    """Killed before the second experience: the resumed run rebuilds the first one's pruned frozen update
    from the checkpoint and runs the second experience's schedule exactly as the uninterrupted run."""
    full, resumed = interrupted_then_resumed(_config(tmp_path, STRATEGY), tmp_path, at=1)
    assert resumed == full


@pytest.mark.parametrize(
    "change, key",
    [
        ({"adapter": "lora"}, "strategy.adapter"),
        ({"rank_budget": 4, "grow_every": 2}, "strategy.grow_every"),
        ({"rank_budget": 4}, "strategy.rank_budget"),
        ({"subspace": "inflora"}, "strategy.subspace"),
        ({"tinit": 8}, "strategy.tinit"),
        ({"target_rank": None}, "strategy.delta_t"),
    ],
)
def test_options_the_schedule_cannot_follow_are_refused_naming_the_key(tmp_path, change, key):
    with pytest.raises(UserError) as error:
        clpeft.config.resolve(_config(tmp_path, {**STRATEGY, **change}))
    assert error.value.key == key and "\n" not in str(error.value)


def test_total_step_left_out_is_the_experience_planned_steps(tmp_path, run_keeping):
    """Without ``total_step`` each experience's schedule runs over the steps the engine plans (2 epochs x 5
    batches = 10 here): the same run, bit for bit, as ``total_step: 10`` given."""
    given, explicit, _ = run_keeping(_config(tmp_path, STRATEGY), tmp_path / "given")
    planned, strategy, _ = run_keeping(_config(tmp_path, {k: v for k, v in STRATEGY.items() if k != "total_step"}), tmp_path / "planned")
    assert strategy.planned_steps == 10 and strategy.schedule.total_step == 10
    assert planned["acc_matrix"] == given["acc_matrix"]
    mine, theirs = strategy.state_dict(), explicit.state_dict()
    assert mine.keys() == theirs.keys()
    assert all(torch.equal(mine[k], theirs[k]) if isinstance(mine[k], torch.Tensor) else mine[k] == theirs[k] for k in mine)


def test_a_schedule_too_long_for_the_planned_steps_is_refused(tmp_path):
    """``tinit + tfinal`` at or over the experience's 10 planned steps: refused in one line at its first epoch."""
    from clpeft.engine import Engine

    strategy = {**{k: v for k, v in STRATEGY.items() if k != "total_step"}, "tinit": 6, "tfinal": 4}
    with pytest.raises(UserError, match="tinit < total_step - tfinal, got tinit=6, tfinal=4, total_step=10") as error:
        Engine(clpeft.config.resolve(_config(tmp_path, strategy)), tmp_path / "run", device="cpu").run()
    assert error.value.key == "strategy.tinit"
