"""AdaLoRA's schedule (``AdaLoRASchedule`` over ``AdaLoRAAllocator``) against peft's AdaLoRA and by hand.

peft's ``AdaLoraModel`` (its ``RankAllocator``, ``update_and_allocate`` and the orthogonal
regulariser its ``forward`` adds to the loss) trains a copy of the same tiny two-layer model from
the same initial ``P``, ``Lambda``, ``Q`` with the same Adam: at every optimizer step the budget,
the mask of the singular values (whenever either side masks), the regulariser and all adapter
tensors must agree, through the warm-up, the cubic fall and the final phase. The budget schedule
is also checked against the cubic formula worked by hand, and the options against their refusals.
"""

from __future__ import annotations

import copy
import types

import pytest
import torch
from test_lora_kinds import _Two
from torch import nn

from clpeft.components.lora import inject_lora, lora_layers
from clpeft.components.lora.adalora_schedule import AdaLoRAOptions, AdaLoRASchedule, check_schedule
from clpeft.errors import UserError

TOL = dict(rtol=0, atol=1e-5)
_NAMES = ("lora_A", "lora_E", "lora_B")


class _WithLoss(nn.Module):
    """``_Two`` returning an object with ``.loss`` (the task loss), to which peft's AdaLoRA adds ``gamma R``."""

    def __init__(self, inner: _Two):
        super().__init__()
        self.a, self.b = inner.a, inner.b

    def forward(self, x, target):
        return types.SimpleNamespace(loss=(self.b(torch.tanh(self.a(x))) - target).square().mean())


def _pair(peft, *, rank: int, **schedule):
    """(our model, its schedule, peft's model): the same base weights and adapter tensors."""
    torch.manual_seed(0)
    base = _Two()
    ours = copy.deepcopy(base)
    layers = inject_lora(ours, ["a", "b"], rank, 6.0, kind="adalora")
    with torch.no_grad():  # nonzero singular values from the start, so every factor has a gradient at step 1
        for layer in layers.values():
            layer.lora_E.normal_(0.0, 0.5)
    config = peft.AdaLoraConfig(
        init_r=rank,
        target_r=schedule["target_rank"],
        lora_alpha=6.0,
        target_modules=["a", "b"],
        total_step=schedule["total_step"],
        tinit=schedule["tinit"],
        tfinal=schedule["tfinal"],
        deltaT=schedule["delta_t"],
        orth_reg_weight=schedule["orth_reg_weight"],
        beta1=0.8,
        beta2=0.8,
    )
    theirs = peft.get_peft_model(_WithLoss(copy.deepcopy(base)), config)
    with torch.no_grad():
        for path, layer in layers.items():
            module = theirs.base_model.model.get_submodule(path)
            for name in _NAMES:
                module.get_parameter(f"{name}.default").copy_(getattr(layer, name))
    plan = AdaLoRASchedule(AdaLoRAOptions(**schedule), beta=0.8)
    plan.start(layers)
    return ours, plan, theirs


def _peft_tensor(theirs, path: str, name: str) -> torch.Tensor:
    return theirs.base_model.model.get_submodule(path).get_parameter(f"{name}.default")


def test_schedule_equals_peft_at_every_step(peft):
    schedule = dict(target_rank=2, total_step=14, tinit=3, tfinal=3, delta_t=2, orth_reg_weight=0.3)
    ours, plan, theirs = _pair(peft, rank=4, **schedule)
    opt_ours = torch.optim.Adam([p for p in ours.parameters() if p.requires_grad], lr=0.05)
    opt_theirs = torch.optim.Adam([p for p in theirs.parameters() if p.requires_grad], lr=0.05)
    gen = torch.Generator().manual_seed(6)  # batches whose final mask differs if the scores took step T - t_f in
    allocator, config = plan.allocator, theirs.peft_config["default"]
    masked_at, kept_per_step = [], []
    for step in range(1, schedule["total_step"] + 1):
        x, target = torch.randn(16, 16, generator=gen), torch.randn(16, 20, generator=gen)
        task = (ours(x) - target).square().mean()
        penalty = plan.penalty()
        opt_ours.zero_grad()
        (task + penalty).backward()
        opt_ours.step()
        kept = plan.after_step()

        opt_theirs.zero_grad()
        out = theirs.base_model(x, target)  # AdaLoraModel.forward adds gamma R to the loss
        torch.testing.assert_close(penalty, out.loss - theirs.base_model.model(x, target).loss, **TOL)
        out.loss.backward()
        opt_theirs.step()
        before = config.rank_pattern
        theirs.base_model.update_and_allocate(step)

        assert allocator.budget(step) == theirs.base_model.rankallocator.budget_schedule(step)
        assert (kept is not None) == (config.rank_pattern is not before)  # both masked at this step, or neither
        if kept is not None:
            masked_at.append(step)
            assert {f"{p}.lora_E.default": k.tolist() for p, k in kept.items()} == {
                k.removeprefix("base_model.model."): v for k, v in config.rank_pattern.items()
            }
        for path, layer in lora_layers(ours).items():
            assert torch.equal(layer.lora_E == 0, _peft_tensor(theirs, path, "lora_E") == 0), step  # the same mask
            for name in _NAMES:
                torch.testing.assert_close(getattr(layer, name), _peft_tensor(theirs, path, name), **TOL)
        kept_per_step.append(sum(int(layer.lora_E.ne(0).sum()) for layer in lora_layers(ours).values()))
    # masks at even steps of the fall (4..10, deltaT = 2), then the final mask at 11 = T - t_f; none after
    assert masked_at == [4, 6, 8, 10, 11]
    assert kept_per_step[:3] == [8, 8, 8] and kept_per_step[-4:] == [4, 4, 4, 4]  # 2 layers x 4 -> 2 layers x target_r 2


def test_finish_drops_the_masked_triplets_and_keeps_the_output(recwarn):
    torch.manual_seed(0)
    model = _Two()
    layers = inject_lora(model, ["a", "b"], 3, 6.0, kind="adalora")
    plan = AdaLoRASchedule(AdaLoRAOptions(target_rank=1, total_step=4, tinit=1), beta=0.85)
    plan.start(layers)
    x = torch.randn(8, 16)
    for _ in range(4):
        model.zero_grad()
        model(x).square().mean().backward()
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.sub_(0.1 * p.grad)
        plan.after_step()
    kept = {name: int(layer.lora_E.ne(0).sum()) for name, layer in layers.items()}
    assert sum(kept.values()) == 2  # target_rank 1 x 2 layers
    with torch.no_grad():
        before = model(x)
        plan.finish()
        assert {name: layer.rank for name, layer in layers.items()} == kept
        torch.testing.assert_close(model(x), before, rtol=0, atol=1e-6)
    assert not recwarn.list  # the schedule reached its final mask


def test_finish_warns_when_the_experience_ends_before_the_final_budget():
    layers = inject_lora(_Two(), ["a", "b"], 3, 6.0, kind="adalora")
    plan = AdaLoRASchedule(AdaLoRAOptions(target_rank=1, total_step=10, tinit=2), beta=0.85)
    plan.start(layers)
    plan.step = 3  # the budget at step 3 of 10, t_i = 2: int(4 (1 - 1/8)^3 + 2) = int(4.68) = 4
    with pytest.warns(
        UserWarning, match="trained 3 optimizer steps, fewer than total_step - tfinal = 10, so its budget stopped at 4 instead of 2"
    ):
        plan.finish()


def test_budget_follows_the_cubic_schedule_by_hand():
    """``b(t) = b_T + (b_0 - b_T) (1 - (t - t_i) / (T - t_f - t_i))^3``, truncated; b_0 = 2 x 4, b_T = 2 x 1.

    ``T = 10``, ``t_i = 1``, ``t_f = 2``: t = 2..8 have ``1 - (t - 1) / 7`` = 6/7 .. 0, so
    ``2 + 6 (6/7)^3 = 5.78``, ``2 + 6 (5/7)^3 = 4.19``, ``2 + 6 (4/7)^3 = 3.12``,
    ``2 + 6 (3/7)^3 = 2.47``, then 2.14, 2.02, 2.
    """
    layers = inject_lora(_Two(), ["a", "b"], 4, 8.0, kind="adalora")
    plan = AdaLoRASchedule(AdaLoRAOptions(target_rank=1, total_step=10, tinit=1, tfinal=2, delta_t=2), beta=0.85)
    plan.start(layers)
    schedule = [plan.allocator.budget(t) for t in range(1, 11)]
    assert [b for b, _ in schedule] == [8, 5, 4, 3, 2, 2, 2, 2, 2, 2]
    assert [m for _, m in schedule] == [False, True, False, True, False, True, False, True, True, True]


@pytest.mark.parametrize(
    "options, match",
    [
        (dict(tinit=3), "tinit belong to AdaLoRA's schedule; set target_rank too"),
        (dict(target_rank=2, total_step=10, tinit=6, tfinal=4), "needs tinit < total_step - tfinal"),
    ],
)
def test_incomplete_options_are_refused(options, match):
    with pytest.raises(UserError, match=match):
        AdaLoRAOptions(**options)


@pytest.mark.parametrize(
    "params, key",
    [
        (dict(adapter="lora"), "strategy.adapter"),
        (dict(adapter="adalora", grow_every=2, rank_budget=8), "strategy.grow_every"),
        (dict(adapter="adalora", rank_budget=8), "strategy.rank_budget"),
        (dict(adapter="adalora", subspace="inflora"), "strategy.subspace"),
    ],
)
def test_clashing_options_are_refused_in_one_line(params, key):
    with pytest.raises(UserError) as error:
        check_schedule({"target_rank": 2, "total_step": 10, **params})
    assert error.value.key == key and "\n" not in str(error.value)
    check_schedule({"target_rank": None, "total_step": None, "tinit": 0, **params})  # no schedule: not refused here


def test_start_takes_the_planned_steps_when_total_step_is_left_out():
    layers = inject_lora(_Two(), ["a", "b"], 4, 8.0, kind="adalora")
    plan = AdaLoRASchedule(AdaLoRAOptions(target_rank=1, tinit=1, tfinal=2, delta_t=2), beta=0.85)
    with pytest.raises(UserError, match="needs total_step here"):
        plan.start(layers)
    plan.start(layers, planned_steps=10)  # the by-hand schedule of test_budget_follows_the_cubic_schedule_by_hand
    assert [plan.allocator.budget(t)[0] for t in range(1, 11)] == [8, 5, 4, 3, 2, 2, 2, 2, 2, 2]
    with pytest.raises(UserError, match="got tinit=1, tfinal=2, total_step=3"):
        plan.start(layers, planned_steps=3)
