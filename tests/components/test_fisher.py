"""Tests for ``clpeft.components.regularization.fisher``: the empirical Fisher and the EWC penalty.

References: Kirkpatrick et al. (2017), eq. 3, and Schwarz et al. (2018) for online EWC
(``F* <- gamma F* + F_new``, anchored at the latest parameters). Expected values come from a
plain per-sample ``loss.backward()`` loop and from the penalty formula written out in numpy.
"""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from clpeft.components.regularization.fisher import FisherPenalty, empirical_fisher


def _model(seed=0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3))
    model[0].bias.requires_grad_(False)  # a frozen parameter must be left out
    return model


def _loop_fisher(model, xs, ys, loss_fn=F.cross_entropy):
    """Mean of squared per-sample gradients, one backward() per sample."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    acc = {n: torch.zeros_like(p) for n, p in params.items()}
    for i in range(len(ys)):
        model.zero_grad()
        loss_fn(model(xs[i : i + 1]), ys[i : i + 1]).backward()
        for n, p in params.items():
            acc[n] += p.grad.detach() ** 2
    return {n: a / len(ys) for n, a in acc.items()}


def test_empirical_fisher_equals_per_sample_backward_loop():
    model = _model()
    g = torch.Generator().manual_seed(1)
    xs = torch.randn(12, 5, generator=g)
    ys = torch.randint(0, 3, (12,), generator=g)
    # uneven batches: the mean is over samples, not batches
    batches = [(xs[:7], ys[:7]), (xs[7:8], ys[7:8]), (xs[8:], ys[8:])]
    got = empirical_fisher(model, batches, F.cross_entropy)
    expected = _loop_fisher(model, xs, ys)
    assert set(got) == set(expected) == {"0.weight", "2.weight", "2.bias"}
    for n in expected:
        assert got[n].shape == expected[n].shape
        torch.testing.assert_close(got[n], expected[n], rtol=1e-5, atol=1e-8)
    assert all(f.min() >= 0 for f in got.values())
    # the batch-mean gradient squared is a different (smaller) quantity: make sure we did not get it
    model.zero_grad()
    F.cross_entropy(model(xs), ys).backward()
    assert not torch.allclose(got["2.weight"], model[2].weight.grad ** 2)


def test_empirical_fisher_with_a_custom_loss_and_model_unchanged():
    model = _model(seed=3)
    before = {n: p.detach().clone() for n, p in model.state_dict().items()}
    g = torch.Generator().manual_seed(2)
    xs = torch.randn(6, 5, generator=g)
    ys = torch.randint(0, 3, (6,), generator=g)

    def nll_sum(logits, y):
        return 2.0 * F.cross_entropy(logits, y, reduction="sum")

    got = empirical_fisher(model, [(xs, ys)], nll_sum)
    expected = _loop_fisher(model, xs, ys, nll_sum)
    for n in expected:
        torch.testing.assert_close(got[n], expected[n], rtol=1e-5, atol=1e-8)
    for n, p in model.state_dict().items():
        assert torch.equal(p, before[n])


def test_empirical_fisher_of_no_data_is_zero():
    model = _model()
    got = empirical_fisher(model, [], F.cross_entropy)
    assert all(torch.count_nonzero(f) == 0 for f in got.values())


# --------------------------------------------------------------------------------------------
# FisherPenalty
# --------------------------------------------------------------------------------------------


def _rand(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _penalty_np(params, terms):
    """sum_k sum_i F_k,i (theta_i - theta*_k,i)^2, on the slice each term recorded."""
    total = 0.0
    for anchors, fisher in terms:
        for n, f in fisher.items():
            a = anchors[n].double().numpy()
            p = params[n].detach().double().numpy()[tuple(slice(0, s) for s in a.shape)]
            total += float((f.double().numpy() * (p - a) ** 2).sum())
    return total


def test_separate_mode_equals_explicit_formula():
    pen = FisherPenalty("separate")
    a1 = {"w": _rand(3, 4, seed=0), "b": _rand(3, seed=1)}
    f1 = {"w": _rand(3, 4, seed=2).abs(), "b": _rand(3, seed=3).abs()}
    a2 = {"w": _rand(3, 4, seed=4), "b": _rand(3, seed=5)}
    f2 = {"w": _rand(3, 4, seed=6).abs(), "b": _rand(3, seed=7).abs()}
    pen.add(a1, f1)
    pen.add(a2, f2)
    assert len(pen.terms) == 2
    params = {"w": _rand(3, 4, seed=8), "b": _rand(3, seed=9)}
    got = pen(params)
    assert got.item() == pytest.approx(_penalty_np(params, [(a1, f1), (a2, f2)]), rel=1e-5)


def test_penalty_is_zero_at_the_anchor_and_has_the_right_gradient():
    pen = FisherPenalty()
    anchor = {"w": _rand(2, 3, seed=0)}
    fisher = {"w": _rand(2, 3, seed=1).abs()}
    pen.add(anchor, fisher)
    w = anchor["w"].clone().requires_grad_(True)
    assert pen({"w": w}).item() == 0.0
    w2 = (anchor["w"] + _rand(2, 3, seed=2)).requires_grad_(True)
    pen({"w": w2}).backward()
    torch.testing.assert_close(w2.grad, 2 * fisher["w"] * (w2.detach() - anchor["w"]))


def test_anchors_are_copied_not_aliased():
    # EWC passes the live parameters as anchors: training them afterwards must move away from
    # the anchor, not drag it along.
    lin = nn.Linear(3, 2)
    pen = FisherPenalty()
    fisher = {n: torch.ones_like(p) for n, p in lin.named_parameters()}
    pen.add(dict(lin.named_parameters()), fisher)
    before = {n: p.detach().clone() for n, p in lin.named_parameters()}
    with torch.no_grad():
        lin.weight.add_(0.5)
    got = pen(dict(lin.named_parameters())).item()
    assert got == pytest.approx(0.25 * lin.weight.numel(), rel=1e-6)
    assert got == pytest.approx(_penalty_np(dict(lin.named_parameters()), [(before, fisher)]), rel=1e-6)


def test_grown_parameter_is_penalised_on_the_old_slice_only():
    pen = FisherPenalty()
    anchor = {"head.weight": _rand(3, 4, seed=0), "head.bias": _rand(3, seed=1)}
    fisher = {"head.weight": _rand(3, 4, seed=2).abs(), "head.bias": _rand(3, seed=3).abs()}
    pen.add(anchor, fisher)
    # the head grew from 3 to 5 classes; rows 3, 4 are new
    grown = {
        "head.weight": torch.cat([anchor["head.weight"] + 0.1 * _rand(3, 4, seed=4), _rand(2, 4, seed=5)]),
        "head.bias": torch.cat([anchor["head.bias"] + 0.1 * _rand(3, seed=6), _rand(2, seed=7)]),
    }
    value = pen(grown).item()
    assert value > 0
    assert value == pytest.approx(_penalty_np(grown, [(anchor, fisher)]), rel=1e-5)
    # changing only the new rows changes nothing
    moved = {n: t.clone() for n, t in grown.items()}
    moved["head.weight"][3:] += 100.0
    moved["head.bias"][3:] -= 100.0
    assert pen(moved).item() == value
    # and the gradient on the new rows is zero
    w = grown["head.weight"].clone().requires_grad_(True)
    pen({"head.weight": w, "head.bias": grown["head.bias"]}).backward()
    assert torch.count_nonzero(w.grad[3:]) == 0 and torch.count_nonzero(w.grad[:3]) > 0


def test_parameters_without_a_term_are_ignored():
    pen = FisherPenalty()
    pen.add({"a": torch.zeros(2)}, {"a": torch.ones(2)})
    assert pen({"a": torch.tensor([1.0, 2.0]), "new": torch.full((3,), 50.0)}).item() == pytest.approx(5.0)


def test_online_mode_keeps_one_decayed_term():
    gamma = 0.7
    pen = FisherPenalty("online", decay=gamma)
    a = [{"w": _rand(3, 2, seed=10 + k)} for k in range(3)]
    f = [{"w": _rand(3, 2, seed=20 + k).abs()} for k in range(3)]
    for k in range(3):
        pen.add(a[k], f[k])
        assert len(pen.terms) == 1
    # F* = F3 + gamma F2 + gamma^2 F1, anchored at theta*_3
    f_star = f[2]["w"] + gamma * f[1]["w"] + gamma**2 * f[0]["w"]
    anchor, stored_f = pen.terms[0]["w"]
    torch.testing.assert_close(stored_f, f_star)
    assert torch.equal(anchor, a[2]["w"])
    params = {"w": _rand(3, 2, seed=99)}
    assert pen(params).item() == pytest.approx(_penalty_np(params, [(a[2], {"w": f_star})]), rel=1e-5)
    # the caller's Fisher dicts were not modified by the in-place accumulation
    torch.testing.assert_close(f[2]["w"], _rand(3, 2, seed=22).abs())


def test_online_mode_with_a_grown_parameter_decays_into_the_old_slice():
    gamma = 0.5
    pen = FisherPenalty("online", decay=gamma)
    pen.add({"w": torch.zeros(2, 3)}, {"w": torch.full((2, 3), 4.0)})
    pen.add({"w": torch.ones(4, 3)}, {"w": torch.full((4, 3), 1.0)})
    _, f_star = pen.terms[0]["w"]
    expected = torch.ones(4, 3)
    expected[:2] += gamma * 4.0
    torch.testing.assert_close(f_star, expected)
    # theta = 0 everywhere: penalty = sum F* * 1^2 = 2*3*3 + 2*3*1 = 24
    assert pen({"w": torch.zeros(4, 3)}).item() == pytest.approx(24.0)


def test_online_decay_one_equals_sum_of_separate_fishers_at_the_last_anchor():
    online, separate = FisherPenalty("online", 1.0), FisherPenalty("separate")
    f1, f2 = {"w": torch.full((3,), 2.0)}, {"w": torch.full((3,), 5.0)}
    a2 = {"w": torch.tensor([1.0, -1.0, 0.5])}
    online.add({"w": torch.zeros(3)}, f1)
    online.add(a2, f2)
    separate.add(a2, f1)
    separate.add(a2, f2)
    p = {"w": torch.tensor([0.0, 2.0, 3.0])}
    assert online(p).item() == pytest.approx(separate(p).item())


class _Holder(nn.Module):
    def __init__(self, mode="separate", decay=1.0):
        super().__init__()
        self.lin = nn.Linear(2, 2)
        self.penalty = FisherPenalty(mode, decay)


@pytest.mark.parametrize("mode", ["separate", "online"])
def test_state_dict_round_trip(mode):
    src = _Holder(mode, 0.9)
    for k in range(2):
        src.penalty.add(
            {"w": _rand(3, 2, seed=k), "b": _rand(2, seed=10 + k)}, {"w": _rand(3, 2, seed=20 + k).abs(), "b": _rand(2, seed=30 + k).abs()}
        )
    blob = io.BytesIO()
    torch.save(src.state_dict(), blob)
    blob.seek(0)
    dst = _Holder(mode, 0.9)
    dst.load_state_dict(torch.load(blob, weights_only=False))
    assert len(dst.penalty.terms) == len(src.penalty.terms)
    params = {"w": _rand(3, 2, seed=50), "b": _rand(2, seed=51)}
    assert dst.penalty(params).item() == src.penalty(params).item() > 0
    # continuing after the load behaves like the original
    new = ({"w": _rand(3, 2, seed=60), "b": _rand(2, seed=61)}, {"w": torch.ones(3, 2), "b": torch.ones(2)})
    src.penalty.add(*new)
    dst.penalty.add(*new)
    assert dst.penalty(params).item() == pytest.approx(src.penalty(params).item())


def test_loaded_state_is_independent_of_the_source_module():
    """``load_state_dict`` copies state into the module (as it does for parameters): adding a
    term to the loaded module must not change the module it was loaded from."""
    src = _Holder()
    src.penalty.add({"w": torch.zeros(2)}, {"w": torch.ones(2)})
    dst = _Holder()
    dst.load_state_dict(src.state_dict())
    dst.penalty.add({"w": torch.ones(2)}, {"w": torch.ones(2)})
    assert len(src.penalty.terms) == 1, "the source module gained a term added to the loaded copy"
    assert len(dst.penalty.terms) == 2
