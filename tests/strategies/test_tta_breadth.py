"""SAR, RDumb and DeYO driven through their hooks on the digits source model of ``test_tta_methods.py``.

The source model (a small BatchNorm CNN trained on clean scikit-learn digits) and the noisy test
stream are that file's fixture. Checked here against independent computations: SAM's step
written out with ``torch.func`` (SAR), DeYO's loss from the strategy's components applied by hand;
and behaviours: each method lowers the source model's error, RDumb returns to the source every
``T`` steps (across domains), SAR recovers from a collapse, a saved state resumes identically and
a loaded source state starts over.
"""
# ruff: noqa: F811  (the tests request the imported module fixture ``source`` by name)

from __future__ import annotations

import copy
import math

import pytest
import torch
from test_tta_methods import _adapt, _batches, _is_bn, _make, source  # noqa: F401  (source: that module's fixture)
from torch.func import functional_call

from clpeft.backbones.mlp import MLPBackbone
from clpeft.components.tta.category_balanced_memory import CategoryBalancedMemory, timeliness_weight
from clpeft.components.tta.losses import entropy
from clpeft.components.tta.object_destruction import destroy_objects
from clpeft.components.tta.online_adaptation import classifier
from clpeft.components.tta.prior_batch_norm import PriorBatchNorm
from clpeft.components.tta.robust_batch_norm import RobustBatchNorm
from clpeft.errors import UserError
from clpeft.registry import strategies

METHODS = ["sar", "rdumb", "deyo", "memo", "rotta"]
NORM_METHODS = ["sar", "rdumb", "deyo", "rotta"]  # MEMO adapts every layer: any backbone will do


def _params(strategy) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in classifier(strategy.backbone, strategy.head).named_parameters()}


def _source_params(source) -> dict[str, torch.Tensor]:
    return {**{f"0.{k}": v for k, v in source["backbone"].items()}, **{f"1.{k}": v for k, v in source["head"].items()}}


def _at_source(strategy, source) -> bool:
    expected = _source_params(source)
    return all(torch.equal(p, expected[n]) for n, p in _params(strategy).items())


# ------------------------------------------------------------------ contract


@pytest.mark.parametrize("name", METHODS)
def test_declares_tta_and_cites_the_paper(name):
    cls = strategies.get(name)
    assert cls.supported_scenarios == ("test_time_adaptation",)
    first = cls.__doc__.strip().splitlines()[0]
    assert any(ch.isdigit() for ch in first) and "(" in first


@pytest.mark.parametrize("name", NORM_METHODS)
def test_norm_methods_refuse_a_backbone_without_norm_layers(name):
    with pytest.raises(UserError, match="normalisation layers"):
        strategies.get(name)(MLPBackbone((1, 8, 8), hidden=[8]))


@pytest.mark.parametrize("name", NORM_METHODS)
def test_adaptation_lowers_the_error_of_the_source_model_on_the_noisy_stream(source, name):
    """Six batches of 64 noisy digits, continual: fewer mistakes than the unadapted model. Not
    MEMO: on 8 x 8 digits its CIFAR AugMix views (4-pixel pad-and-crop, translations by a third)
    do not keep the label, and its one step per point raises the error (measured: 0.52 against the
    source's 0.37 on two batches, 0.34 with the prior BatchNorm alone)."""
    errors = {}
    for method in ["source", name]:
        s = _make(method, source)
        errors[method] = sum(
            int((_adapt(s, x).argmax(1) != source["y"][i * 64 : (i + 1) * 64]).sum()) for i, x in enumerate(_batches(source, 6))
        ) / (6 * 64)
    assert errors[name] < errors["source"], errors


# ------------------------------------------------------------------ sar


def test_sar_step_is_sharpness_aware_sgd_on_the_reliable_entropy(source):
    """One batch: the prediction before the step, and the weights after it equal SAM written out
    (the gradient of the reliable samples' mean entropy at ``w``, ``e = rho g / ||g||``, the
    gradient at ``w + e`` of the mean over those still reliable there, one SGD step, momentum
    buffer = that gradient), with only the BatchNorm affine parameters moving."""
    s = _make("sar", source, lr=0.05, rho=0.5, reset_constant=0.0)
    x = _batches(source, 1)[0]
    net = copy.deepcopy(classifier(s.backbone, s.head))
    names = [n for n, p in net.named_parameters() if p.requires_grad]
    w = {n: p.detach().clone() for n, p in net.named_parameters()}
    margin = 0.4 * math.log(10)

    def entropies(weights):
        return entropy(functional_call(net, weights, (x,)))

    h = entropies(w)
    reliable = h < margin
    assert 0 < int(reliable.sum()) < len(x)
    first = {n: w[n].clone().requires_grad_(n in names) for n in w}
    g = torch.autograd.grad(entropies(first)[reliable].mean(), [first[n] for n in names])
    norm = torch.stack([t.norm() for t in g]).norm()
    perturbed = {n: w[n].clone() for n in w}
    for n, t in zip(names, g):
        perturbed[n] = (perturbed[n] + 0.5 * t / (norm + 1e-12)).requires_grad_(True)
    h2 = entropies(perturbed)[reliable]
    g2 = torch.autograd.grad(h2[h2 < margin].mean(), [perturbed[n] for n in names])
    expected = {n: w[n] - 0.05 * t for n, t in zip(names, g2)}

    out = _adapt(s, x)
    with torch.no_grad():
        torch.testing.assert_close(out, functional_call(net, w, (x,)))
    after = _params(s)
    for n in w:
        torch.testing.assert_close(after[n], expected.get(n, w[n]), rtol=1e-5, atol=1e-7)
    assert set(names) == {f"0.{n}" for n, _ in s.backbone.named_parameters() if _is_bn(n)}
    assert s.loss_ema.item() == pytest.approx(h2[h2 < margin].mean().item(), rel=1e-5)


def test_sar_recovers_the_source_model_after_a_collapse(source):
    """After two batches (``e_m`` about 0.19, above ``e_0 = 0.15``) the model collapses to
    overconfident predictions (its head scaled by 50: entropies near 0); ``e_m`` decays below
    ``e_0`` within a few batches and the whole model, head included, is the source model again,
    ``e_m`` starting over. With ``e_0 = 0`` the same stream never recovers: ``e_m`` falls at every
    batch after the collapse, below the ``e_0 = 0.15`` that reset the first run, and nothing resets.
    (How far it falls in ten batches depends on the CPU's float32 trajectory: 0.113 on an AMD Zen 3, below 0.1 on
    the machines before.)"""

    def run(reset_constant):
        s = _make("sar", source, lr=0.05, reset_constant=reset_constant)
        emas = []
        for i, x in enumerate(_batches(source, 10, 32)):
            if i == 2:
                assert s.loss_ema > 0.15 and not _at_source(s, source)
                with torch.no_grad():
                    s.head.weight.mul_(50)
            _adapt(s, x)
            emas.append(s.loss_ema.item())
            if math.isnan(emas[-1]):
                break
        return s, emas

    s, emas = run(0.15)
    assert math.isnan(emas[-1]) and 3 < len(emas) < 10 and _at_source(s, source), emas
    never, emas = run(0.0)
    assert len(emas) == 10 and emas[-1] < 0.15 and not _at_source(never, source), emas
    assert all(later < earlier for earlier, later in zip(emas[2:], emas[3:])), emas


# ------------------------------------------------------------------ rdumb


def test_rdumb_returns_to_the_source_every_t_steps_across_domains(source):
    """``T = 3``: after steps 1-2 the model has moved, after step 3 it is the source model with a
    fresh optimizer and no moving probability vector; the count goes on in the next domain
    (``before_experience`` again), so the next reset comes after step 6."""
    s = _make("rdumb", source, reset_every=3, lr=1e-2, redundancy_margin=1.0)
    batches = _batches(source, 6)
    for i, x in enumerate(batches):
        if i == 4:
            s.before_experience(source["tta_exp"])  # a new domain of the stream
        _adapt(s, x)
        at_source = _at_source(s, source)
        assert at_source == (i in (2, 5)), i
        if at_source:
            assert s.filter.moving_probs is None and not s.adaptation.optimizer.get_extra_state()["optimizer"]["state"]
    assert int(s.steps) == 6


# ------------------------------------------------------------------ deyo


def test_deyo_loss_is_the_plpd_and_entropy_weighted_entropy_of_the_kept_samples(source, monkeypatch):
    """The loss of each batch equals the strategy's own components applied by hand (entropy
    filter, the destroyed images' prediction, PLPD filter, weights ``exp(E_0 - H) + exp(PLPD)``),
    with the same patch order drawn."""
    s = _make("deyo", source, lr=1e-2)
    losses = []
    step = s.adaptation.step
    monkeypatch.setattr(s.adaptation, "step", lambda loss: (losses.append(loss.item()), step(loss)))
    expected = []
    for i, x in enumerate(_batches(source, 3)):
        probe = copy.deepcopy(s)
        with torch.no_grad():
            logits = probe.predict(x)
            h = entropy(logits)
            kept = h < 0.5 * math.log(10)
            torch.manual_seed(i)
            destroyed = probe.predict(destroy_objects(x[kept].float() / 255)).softmax(1)
            p = logits[kept].softmax(1)
            label = p.argmax(1, keepdim=True)
            plpd = (p.gather(1, label) - destroyed.gather(1, label)).view(-1)
            passed = plpd > 0.2
            hk = h[kept][passed]
            weight = torch.exp(0.4 * math.log(10) - hk) + torch.exp(plpd[passed])
        if passed.any():
            expected.append((hk * weight).mean().item())
        torch.manual_seed(i)
        _adapt(s, x)
    assert len(losses) == len(expected) >= 2
    assert losses == pytest.approx(expected, rel=1e-5)


def test_deyo_takes_no_step_when_no_prediction_depends_on_the_object(source):
    s = _make("deyo", source, plpd_threshold=1.0)
    for x in _batches(source, 2):
        _adapt(s, x)
    assert _at_source(s, source)


# ------------------------------------------------------------------ memo


def test_memo_predicts_each_point_alone_from_the_source_model(source):
    """A batch gives, point by point, what one-point batches give (same draws): each point is
    adapted from the source model, whatever came before; the adapted model differs from the
    source and its BatchNorm running statistics are untouched (the prior only reads them)."""
    x = _batches(source, 1, 5)[0]
    together = _make("memo", source, n_augmentations=4)
    alone = _make("memo", source, n_augmentations=4)
    torch.manual_seed(7)
    batch = _adapt(together, x)
    torch.manual_seed(7)
    points = torch.cat([_adapt(alone, x[i : i + 1]) for i in range(len(x))])
    torch.testing.assert_close(batch, points, rtol=1e-5, atol=1e-6)
    assert not _at_source(together, source)
    for name, buffer in together.backbone.named_buffers():
        assert torch.equal(buffer, source["backbone"][name]), name


def test_memo_step_minimises_the_marginal_entropy_of_the_views(source, monkeypatch):
    """The loss of a point is the entropy of the mean softmax over its views (computed here from
    the views the strategy drew), and its one SGD step lowers it."""
    s = _make("memo", source, n_augmentations=6, lr=0.05)
    drawn, losses = [], []
    views = s.augmix.views
    monkeypatch.setattr(s.augmix, "views", lambda image, n: (lambda v: (drawn.append(v), v)[1])(views(image, n)))
    step = s.adaptation.step
    monkeypatch.setattr(s.adaptation, "step", lambda loss: (losses.append(loss.item()), step(loss)))
    x = _batches(source, 1, 1)[0]
    with torch.no_grad():
        before = copy.deepcopy(s)
    _adapt(s, x)
    with torch.no_grad():
        mean = before.predict(drawn[0][1:]).softmax(1).mean(0)
        after = s.predict(drawn[0][1:]).softmax(1).mean(0)
    assert losses[0] == pytest.approx(float(-(mean * mean.log()).sum()), rel=1e-5)
    assert float(-(after * after.log()).sum()) < losses[0]


# ------------------------------------------------------------------ rotta


def test_rotta_keeps_its_accuracy_on_a_stream_sorted_by_label(source):
    """The noisy digits sorted by label (batches of one or two classes, the correlated stream
    RoTTA targets): test-batch statistics break (bn_adapt and Tent fall below the source model),
    RoTTA's robust statistics and balanced memory do not (measured: 0.34 against the source's
    0.38, bn_adapt's 0.55)."""
    order = torch.argsort(source["y"], stable=True)
    x, y = source["noisy"][order], source["y"][order]
    errors = {}
    for name in ["source", "bn_adapt", "rotta"]:
        s = _make(name, source)
        errors[name] = sum(int((_adapt(s, x[i : i + 64]).argmax(1) != y[i : i + 64]).sum()) for i in range(0, len(x), 64)) / len(x)
    assert errors["rotta"] < errors["source"] < errors["bn_adapt"], errors


def test_category_balanced_memory_keeps_classes_balanced_and_evicts_the_highest_score():
    """Capacity 4 over 2 classes (2 per class): a class never holds more than its share while
    it is full; a new sample replaces its class's highest-scoring (most uncertain, oldest)
    sample when that scores higher than the newcomer, and is dropped otherwise; with a full
    memory a minority class's sample evicts from the fullest class; ages count the samples
    offered since; the loss weights are ``exp(-a/N) / (1 + exp(-a/N))``."""
    memory = CategoryBalancedMemory(4, 2)
    for u in (0.9, 0.1):
        memory.add(torch.tensor([u]), 0, u)
    memory.add(torch.tensor([0.5]), 0, 0.5)  # class 0 full: evicts the 0.9 one (score above 0.5's)
    assert [(round(float(s), 1), a) for s, _, a in memory.items[0]] == [(0.1, 2), (0.5, 1)]
    memory.add(torch.tensor([0.95]), 0, 0.95)  # scores above both stored: dropped
    assert [round(float(s), 1) for s, _, _ in memory.items[0]] == [0.1, 0.5]
    memory.add(torch.tensor([0.3]), 1, 0.3)
    memory.add(torch.tensor([0.2]), 1, 0.2)
    assert [len(g) for g in memory.items] == [2, 2]
    samples, ages = memory.batch()
    assert samples.flatten().tolist() == pytest.approx([0.1, 0.5, 0.3, 0.2]) and ages.tolist() == [5, 4, 2, 1]
    full = CategoryBalancedMemory(4, 3)  # share 4/3: a class may hold 2 while the memory has room
    for label in (0, 0, 1, 1):
        full.add(torch.tensor([float(label)]), label, 0.5)
    full.add(torch.tensor([2.0]), 2, 0.1)  # memory full, class 2 below its share: evicts from classes 0 and 1
    assert sorted(len(g) for g in full.items) == [1, 1, 2] and len(full.items[2]) == 1
    assert len(full.items[0]) == 1  # the oldest of the fullest classes' samples went
    weights = timeliness_weight(torch.tensor([0, 4, 400]), 4)
    assert weights.tolist() == pytest.approx([0.5, math.exp(-1) / (1 + math.exp(-1)), math.exp(-100) / (1 + math.exp(-100))])


# ------------------------------------------------------------------ bn_adapt statistics


def _predictions(strategy, source, n: int = 6, size: int = 64) -> torch.Tensor:
    return torch.cat([_adapt(strategy, x) for x in _batches(source, n, size)])


def test_bn_adapt_alpha_spans_source_and_batch_statistics_and_ema_moves_the_running_ones(source):
    """``alpha: 0`` predicts as the source model, ``alpha: 1`` as BatchNorm on each batch's
    statistics (up to the unbiased variance); ``ema`` changes the running statistics a little
    per batch (momentum 0.1 from the source's) and a loaded source state undoes it; every
    variant makes fewer mistakes than the source model on the noisy digits."""
    y = source["y"][: 6 * 64]
    errors = {}
    for name, params in [
        ("source", {}),
        ("batch", {}),
        ("alpha_0", {"statistics": "alpha", "alpha": 0.0}),
        ("alpha_1", {"statistics": "alpha", "alpha": 1.0}),
        ("alpha", {"statistics": "alpha"}),
        ("ema", {"statistics": "ema"}),
    ]:
        s = _make("source" if name == "source" else "bn_adapt", source, **params)
        out = _predictions(s, source)
        errors[name] = float((out.argmax(1) != y).float().mean())
        if name == "source":
            source_out = out
        if name == "batch":
            batch_out = out
        if name == "alpha_0":
            torch.testing.assert_close(out, source_out)
        if name == "alpha_1":
            torch.testing.assert_close(out, batch_out, rtol=0.05, atol=0.05)
            assert (out.argmax(1) == batch_out.argmax(1)).float().mean() > 0.97
    for name in ("batch", "alpha", "ema"):
        assert errors[name] < errors["source"], errors
    s = _make("bn_adapt", source, start=False, statistics="ema")
    source_state = copy.deepcopy(s.state_dict())
    s.before_experience(source["tta_exp"])
    mean = s.backbone.stem[1].running_mean
    before = mean.clone()
    _adapt(s, _batches(source, 1)[0])
    moved = (mean - before).abs().max()
    assert 0 < moved < 0.2 * before.abs().max() + 0.1
    s.load_state_dict(source_state)
    assert torch.equal(s.backbone.stem[1].running_mean, before)


def test_prior_batch_norm_replaces_the_forward_once_survives_a_copy_and_detaches():
    """``PriorBatchNorm`` on a layer: the output is BatchNorm with ``(1 - alpha)`` source plus
    ``alpha`` batch statistics (unbiased variance from ``var_mean``), also after a second
    ``attach`` (not applied twice) and in a deep copy (a teacher, a saved source); ``detach``
    gives the layer its own eval-mode output back; the ``state_dict`` keys never change."""
    torch.manual_seed(0)
    layer = torch.nn.BatchNorm2d(3)
    with torch.no_grad():
        layer.running_mean.uniform_(-1, 1)
        layer.running_var.uniform_(0.5, 2)
        layer.weight.uniform_(0.5, 1.5)
        layer.bias.uniform_(-0.5, 0.5)
    keys = list(layer.state_dict())
    x = torch.randn(4, 3, 5, 5) * 2 + 1
    var, mean = torch.var_mean(x, dim=(0, 2, 3), unbiased=True)
    mixed = torch.nn.functional.batch_norm(
        x, 0.7 * layer.running_mean + 0.3 * mean, 0.7 * layer.running_var + 0.3 * var, layer.weight, layer.bias, False, 0.0, layer.eps
    )
    own = torch.nn.functional.batch_norm(x, layer.running_mean, layer.running_var, layer.weight, layer.bias, False, 0.0, layer.eps)
    prior = PriorBatchNorm(0.3)
    prior.attach([layer])
    torch.testing.assert_close(layer(x), mixed)
    prior.attach([layer])
    torch.testing.assert_close(layer(x), mixed)
    torch.testing.assert_close(copy.deepcopy(layer)(x), mixed)
    assert list(layer.state_dict()) == keys
    prior.detach()
    torch.testing.assert_close(layer(x), own)
    prior.attach([layer])
    with pytest.raises(ValueError, match="expected 4D input"):
        layer(x[0])


def test_robust_batch_norm_replaces_the_forward_and_updates_every_attached_layer():
    """``RobustBatchNorm`` on a layer: outside ``updating()`` the eval-mode BatchNorm of the stored
    statistics, without the layer's own forward running (its ``F.batch_norm`` is called once);
    inside, the statistics move by ``alpha`` towards the batch's (biased variance), the output
    uses the moved ones and carries their gradient; a deep copy (a teacher) attached with the
    layer, as RoTTA does, updates in the same block; ``detach`` gives the layers their own forward back."""
    torch.manual_seed(0)
    layer = torch.nn.BatchNorm2d(3)
    with torch.no_grad():
        layer.running_mean.uniform_(-1, 1)
        layer.running_var.uniform_(0.5, 2)
    keys = list(layer.state_dict())
    x = torch.randn(4, 3, 5, 5) * 2 + 1
    stored = (layer.running_mean.clone(), layer.running_var.clone())
    robust = RobustBatchNorm(0.25)
    robust.attach([layer])
    layer.train()  # attach put it in eval mode; a stray train() must not matter either
    calls = []
    real = torch.nn.functional.batch_norm
    with pytest.MonkeyPatch.context() as spy:
        spy.setattr(torch.nn.functional, "batch_norm", lambda *a, **k: calls.append(1) or real(*a, **k))
        out = layer(x)
        assert len(calls) == 1
        torch.testing.assert_close(out, real(x, *stored, layer.weight, layer.bias, False, 0.0, layer.eps))
        teacher = copy.deepcopy(layer)
        robust.attach([layer, teacher])
        var, mean = torch.var_mean(x, dim=(0, 2, 3), unbiased=False)
        moved = (0.75 * stored[0] + 0.25 * mean, 0.75 * stored[1] + 0.25 * var)
        x.requires_grad_(True)
        with robust.updating():
            out = layer(x)
            teacher(x.detach())
    assert len(calls) == 1  # updating forwards normalise once each, by hand (a hook ran BatchNorm first)
    expected = real(x, *moved, layer.weight, layer.bias, False, 0.0, layer.eps)
    torch.testing.assert_close(out, expected)
    for net in (layer, teacher):
        torch.testing.assert_close(net.running_mean, moved[0])
        torch.testing.assert_close(net.running_var, moved[1])
    (grad,) = torch.autograd.grad(out.square().sum(), x)  # through the batch statistics: not eval BatchNorm's
    (frozen,) = torch.autograd.grad(expected.square().sum(), x)
    assert not torch.allclose(grad, frozen)
    assert list(layer.state_dict()) == keys
    robust.detach()
    layer.eval()
    torch.testing.assert_close(layer(x), real(x, *moved, layer.weight, layer.bias, False, 0.0, layer.eps))
    assert "forward" not in layer.__dict__ and "forward" not in teacher.__dict__
    robust.attach([layer])
    copied_robust, copied_layer = copy.deepcopy((robust, layer))  # a strategy copied whole: its own controller
    assert copied_robust is not robust and copied_layer.forward.func.__self__ is copied_robust
    assert copied_robust._layers == [copied_layer]


# ------------------------------------------------------------------ state


@pytest.mark.parametrize(
    ("name", "params"),
    [
        ("sar", {"lr": 0.05}),
        ("rdumb", {"reset_every": 3}),
        ("deyo", {}),
        ("memo", {"n_augmentations": 4}),
        ("rotta", {"memory_size": 16, "update_frequency": 40}),
    ],
)
def test_state_dict_round_trip_continues_identically(source, name, params):
    """Saved after two batches and loaded into a fresh strategy: the third and fourth batches
    give the same predictions and states (RDumb's reset after step 3 and SAR's recovery included)."""
    s = _make(name, source, **params)
    batches = _batches(source, 4, 8 if name == "memo" else 64)  # MEMO adapts point by point
    for x in batches[:2]:
        _adapt(s, x)
    restored = _make(name, source, start=False, **params)
    restored.load_state_dict(copy.deepcopy(s.state_dict()))
    restored.before_experience(source["tta_exp"])
    for i, x in enumerate(batches[2:]):
        torch.manual_seed(i)
        a = _adapt(s, x)
        torch.manual_seed(i)
        assert torch.equal(a, _adapt(restored, x))
    for (n, p), (_, q) in zip(s.state_dict().items(), restored.state_dict().items()):
        if isinstance(p, torch.Tensor):
            assert torch.equal(p, q) or (p.isnan().all() and q.isnan().all()), n


@pytest.mark.parametrize("name", ["sar", "rdumb"])
def test_loading_the_source_state_restarts_from_the_source(source, name):
    """What ``reset_each_domain`` does between domains: the source state loaded (its reset
    snapshot and counters included) gives a fresh start, identical to a new strategy's."""
    s = _make(name, source, start=False, reset_every=2) if name == "rdumb" else _make(name, source, start=False)
    source_state = copy.deepcopy(s.state_dict())
    s.before_experience(source["tta_exp"])
    batches = _batches(source, 3)
    for x in batches[:2]:
        _adapt(s, x)
    s.load_state_dict(source_state)
    s.before_experience(source["tta_exp"])
    fresh = _make(name, source, reset_every=2) if name == "rdumb" else _make(name, source)
    for x in batches[1:]:
        assert torch.equal(_adapt(s, x), _adapt(fresh, x))
    assert _at_source(s, source) == _at_source(fresh, source)
