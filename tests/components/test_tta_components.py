"""Test-time adaptation components against independent (numpy / loop / hand-worked) computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from clpeft.backbones.cnn import CNNBackbone
from clpeft.components.heads.classifiers import LinearHead
from clpeft.components.tta.augment import TTAugment
from clpeft.components.tta.augment_average import augmentation_average, augmentation_average_loop
from clpeft.components.tta.laplacian_adjustment import affinity, laplacian_adjustment
from clpeft.components.tta.losses import (
    EATASampleFilter,
    batch_gradient_importance,
    entropy,
    multi_view_contrastive_loss,
    soft_cross_entropy,
    symmetric_cross_entropy,
)
from clpeft.components.tta.online_adaptation import (
    AdaptationOptimizer,
    OnlineAdaptation,
    adapted_parameters,
    batch_norm_layers,
    check_adaptable,
    classifier,
    use_batch_statistics,
)
from clpeft.components.tta.options import AdaptationOptions
from clpeft.components.tta.source_data import SourceBatches, source_training_data
from clpeft.components.tta.stochastic_restore import StochasticRestore
from clpeft.data import ArrayDataset, DataView
from clpeft.data_access import DataAccess
from clpeft.errors import UserError


def _net(seed: int = 0, widths=(8, 16)) -> nn.Sequential:
    torch.manual_seed(seed)
    backbone = CNNBackbone((1, 12, 12), widths=list(widths))
    return classifier(backbone, LinearHead(backbone.feature_dim, 5))


def _images(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (n, 1, 12, 12), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------ stochastic restore


def test_stochastic_restore_p1_is_the_source_bitwise_and_p0_changes_nothing():
    model, source = _net(0), _net(1)
    before = {n: p.clone() for n, p in model.named_parameters()}
    assert StochasticRestore(0.0)(model, source) == 0
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())
    n = StochasticRestore(1.0)(model, source)
    src = dict(source.named_parameters())
    assert all(torch.equal(p, src[k]) for k, p in model.named_parameters())
    assert n == sum(p.numel() for p in model.parameters())


def test_stochastic_restore_resets_a_p_fraction_elementwise_and_only_trainable_params():
    model, source = _net(0), _net(1)
    model[1].requires_grad_(False)  # the head is not adapted: never restored
    before = {n: p.clone() for n, p in model.named_parameters()}
    src = dict(source.named_parameters())
    n = StochasticRestore(0.3)(model, source, generator=torch.Generator().manual_seed(0))
    total = restored = 0
    for name, p in model.named_parameters():
        if name.startswith("1."):
            assert torch.equal(p, before[name])
            continue
        from_source = p == src[name]
        kept = p == before[name]
        assert bool((from_source | kept).all())  # every element is either the source's or unchanged
        restored += int((from_source & ~kept).sum())
        total += p.numel()
    assert restored <= n
    assert abs(n / total - 0.3) < 0.03


# ------------------------------------------------------------------ augmentation averaging


def test_stacked_augmentation_average_equals_the_python_loop_with_batch_statistics():
    model = _net().eval()
    use_batch_statistics(batch_norm_layers(model))
    x = _images(6)
    augment = TTAugment(flip=0.5)
    with torch.no_grad():
        stacked = augmentation_average(model, x, augment, 8, torch.Generator().manual_seed(3), stacked=True)
        cpu_default = augmentation_average(model, x, augment, 8, torch.Generator().manual_seed(3))  # stacked augment, looped forward
        loop = augmentation_average_loop(model, x, augment, 8, torch.Generator().manual_seed(3))
        plain = model(x)
    torch.testing.assert_close(stacked, loop, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cpu_default, loop, rtol=1e-5, atol=1e-5)
    assert (stacked - plain).abs().max() > 1e-3  # the augmentations did something
    # per-augmentation statistics: one forward over all 48 images at once would differ
    with torch.no_grad():
        pooled = model(augment.apply(x, augment.sample(8, x.shape, torch.Generator().manual_seed(3))))
    assert (pooled.view(8, 6, -1).mean(0) - loop).abs().max() > 1e-4


def test_augment_returns_floats_in_range_and_is_identity_with_trivial_ranges():
    x = _images(4)
    trivial = dict(
        rotate=0,
        translate=0,
        scale=(1, 1),
        brightness=(1, 1),
        contrast=(1, 1),
        saturation=(1, 1),
        hue=(0, 0),
        gamma=(1, 1),
        blur_sigma=(1e-3, 1e-3),
        noise_std=0.0,
    )
    out = TTAugment(flip=0.0, **trivial)(x, torch.Generator().manual_seed(0))
    assert out.dtype == torch.float32  # never re-quantised to uint8
    torch.testing.assert_close(out, x.float() / 255, rtol=0, atol=1e-5)
    flipped = TTAugment(flip=1.0, **trivial)(x)
    torch.testing.assert_close(flipped, x.flip(-1).float() / 255, rtol=0, atol=1e-5)
    f = TTAugment()(x.float() / 255, torch.Generator().manual_seed(1))
    assert f.dtype == torch.float32 and f.min() >= 0 and f.max() <= 1
    a = TTAugment()(x, torch.Generator().manual_seed(2))
    b = TTAugment()(x, torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and (a - x.float() / 255).abs().max() > 0.05


def test_augment_draws_one_set_of_parameters_per_batch():
    """Every image of a batch gets the same augmentation (the reference transforms the batch
    tensor): with flips, shifts and colour, augmenting a batch of one image repeated equals
    augmenting that image alone up to the per-pixel noise, which is drawn per pixel."""
    x = _images(1).repeat(3, 1, 1, 1)
    out = TTAugment(noise_std=0.0)(x, torch.Generator().manual_seed(4))
    assert torch.equal(out[0], out[1]) and torch.equal(out[0], out[2])
    params = TTAugment().sample(5, (3, 1, 12, 12), torch.Generator().manual_seed(0))
    assert params["angle"].shape == (5,) and params["noise"].shape == (5, 3, 1, 12, 12)


# ------------------------------------------------------------------ batch statistics


def test_use_batch_statistics_normalises_with_the_batch_and_leaves_running_stats():
    model = _net().eval()
    bn = model[0].stem[1]
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    running = (bn.running_mean.clone(), bn.running_var.clone())
    seen = {}
    bn.register_forward_hook(lambda m, i, o: seen.update(x=i[0].detach().double().numpy(), y=o.detach().double().numpy()))
    use_batch_statistics(batch_norm_layers(model))
    with torch.no_grad():
        model(_images(7))
    x = seen["x"]
    mean = x.mean(axis=(0, 2, 3), keepdims=True)
    var = x.var(axis=(0, 2, 3), keepdims=True)  # biased, as BatchNorm normalises
    w = bn.weight.detach().double().numpy().reshape(1, -1, 1, 1)
    b = bn.bias.detach().double().numpy().reshape(1, -1, 1, 1)
    np.testing.assert_allclose(seen["y"], (x - mean) / np.sqrt(var + bn.eps) * w + b, rtol=1e-4, atol=1e-4)
    assert torch.equal(bn.running_mean, running[0]) and torch.equal(bn.running_var, running[1])
    assert set(model.state_dict()) == set(_net().state_dict())  # same keys as the source model


def test_adapted_parameters_norm_selects_exactly_the_batchnorm_affine_params():
    model = _net()
    params = adapted_parameters(model, "norm")
    expected = {id(m.weight) for m in batch_norm_layers(model)} | {id(m.bias) for m in batch_norm_layers(model)}
    assert {id(p) for p in params} == expected
    assert {id(p) for p in model.parameters() if p.requires_grad} == expected
    assert len(adapted_parameters(model, "all")) == len(list(model.parameters()))
    with pytest.raises(UserError):
        check_adaptable(nn.Sequential(nn.Linear(2, 2)), "norm", "tent")


def test_adapted_parameters_all_is_every_weight_and_bias_not_tokens_or_embeddings():
    """As the reference's ``collect_params``: a ViT's class token and position embedding stay fixed."""
    from clpeft.backbones.timm_backbone import TimmBackbone

    torch.manual_seed(0)
    vit = TimmBackbone((3, 32, 32), model="test_vit", img_size=32, freeze=False)
    chosen = {id(p) for p in adapted_parameters(vit, "all")}
    names = {n for n, p in vit.named_parameters() if id(p) in chosen}
    assert names == {n for n, _ in vit.named_parameters() if n.endswith((".weight", ".bias"))}
    assert {n for n, p in vit.named_parameters() if not p.requires_grad} == {"net.cls_token", "net.pos_embed"}


def test_adaptation_optimizer_state_round_trips_and_source_state_clears_it():
    model = _net()
    params = adapted_parameters(model, "norm")
    opt = AdaptationOptimizer("adam", lr=0.01)
    source_state = opt.get_extra_state()
    opt.bind(params)
    x = _images(8)
    for _ in range(2):
        opt.step(entropy(model(x)).mean())
    saved = opt.get_extra_state()
    other = _net()
    other.load_state_dict(model.state_dict())
    fresh = AdaptationOptimizer("adam", lr=0.01)
    fresh.set_extra_state(saved)  # loaded before bind: applied at bind
    fresh.bind(adapted_parameters(other, "norm"))
    opt.step(entropy(model(x)).mean())
    fresh.step(entropy(other(x)).mean())
    for a, b in zip(model.parameters(), other.parameters()):
        assert torch.equal(a, b)
    opt.set_extra_state(source_state)
    assert len(opt._optimizer.state) == 0


def test_adaptation_options_configure_the_optimizer_once_for_every_method():
    """One options object sets the torch optimizer (SGD: Nesterov, no dampening; Adam: betas
    (momentum, 0.999)), weight decay included, and ``None`` updates nothing."""
    model = _net()
    sgd = OnlineAdaptation(AdaptationOptions(optimizer="sgd", lr=0.05, momentum=0.5, weight_decay=0.1, params="all"))
    sgd.prepare(model, model)
    group = sgd.optimizer._optimizer.param_groups[0]
    assert isinstance(sgd.optimizer._optimizer, torch.optim.SGD)
    assert (group["lr"], group["momentum"], group["weight_decay"], group["nesterov"], group["dampening"]) == (0.05, 0.5, 0.1, True, 0)
    assert len(group["params"]) == len(list(model.parameters()))
    plain_sgd = OnlineAdaptation(AdaptationOptions(optimizer="sgd", momentum=0.0))
    plain_sgd.prepare(model, model)
    assert plain_sgd.optimizer._optimizer.param_groups[0]["nesterov"] is False  # torch refuses Nesterov without momentum
    adam = OnlineAdaptation(AdaptationOptions(momentum=0.8))
    adam.prepare(model, model)
    group = adam.optimizer._optimizer.param_groups[0]
    assert group["betas"] == (0.8, 0.999) and len(group["params"]) == 2 * len(batch_norm_layers(model))
    frozen = OnlineAdaptation(None)
    frozen.prepare(model, model)
    assert not frozen.optimizer.bound and not any(p.requires_grad for p in model.parameters())
    assert set(frozen.state_dict()) == set(adam.state_dict())  # one checkpoint layout for every TTA method


@pytest.mark.parametrize(
    "field, value", [("lr", 0.0), ("momentum", 1.0), ("weight_decay", -1e-4), ("optimizer", "adamw"), ("params", "none")]
)
def test_adaptation_options_refuse_values_the_optimizer_cannot_take(field, value):
    with pytest.raises(ValueError, match=field):
        AdaptationOptions(**{field: value})


# ------------------------------------------------------------------ losses and EATA's filters


def _np_log_softmax(z):
    z = z - z.max(1, keepdims=True)
    return z - np.log(np.exp(z).sum(1, keepdims=True))


def test_entropy_soft_and_symmetric_cross_entropy_match_numpy():
    s, t = torch.randn(5, 4, dtype=torch.float64), torch.randn(5, 4, dtype=torch.float64)
    ls, lt = _np_log_softmax(s.numpy()), _np_log_softmax(t.numpy())
    np.testing.assert_allclose(entropy(s).numpy(), -(np.exp(ls) * ls).sum(1))
    np.testing.assert_allclose(soft_cross_entropy(s, t).numpy(), -(np.exp(lt) * ls).sum(1))
    expected = 0.5 * -(np.exp(lt) * ls).sum(1) + 0.5 * -(np.exp(ls) * lt).sum(1)
    np.testing.assert_allclose(symmetric_cross_entropy(s, t).numpy(), expected)
    assert entropy(torch.zeros(1, 4)).item() == pytest.approx(math.log(4))  # uniform: ln C


def test_multi_view_contrastive_loss_matches_the_supcon_formula_written_as_loops():
    """Khosla et al. 2020, eq. 2 with the views of a sample as its positives (RMT's eq. 4),
    summed anchor by anchor in numpy."""
    z = F.normalize(torch.randn(4, 3, 6, dtype=torch.float64, generator=torch.Generator().manual_seed(0)), dim=-1)
    t = 0.1
    views = [(i, a) for a in range(3) for i in range(4)]
    total = 0.0
    for i, a in views:
        za = z[i, a].numpy()
        denominator = sum(np.exp(za @ z[j, b].numpy() / t) for j, b in views if (j, b) != (i, a))
        positives = [np.log(np.exp(za @ z[i, b].numpy() / t) / denominator) for b in range(3) if b != a]
        total += -np.mean(positives)
    np.testing.assert_allclose(multi_view_contrastive_loss(z, t).item(), total / len(views), rtol=1e-10)
    aligned = F.normalize(torch.eye(4, 6, dtype=torch.float64), dim=1)[:, None].repeat(1, 3, 1)
    assert multi_view_contrastive_loss(aligned, t) < multi_view_contrastive_loss(z, t)


def _source_view(n: int = 10) -> DataView:
    return DataView.of(ArrayDataset(torch.arange(n, dtype=torch.float32)[:, None], torch.arange(n) % 2, "ids"))


class _Loader(nn.Module):
    """The part of a strategy :class:`SourceBatches` uses: ``batches`` as the engine loads them."""

    def batches(self, view, batch_size):
        return DataAccess(torch.device("cpu"), None, nn.Identity(), batch_size).batches(view, batch_size)


def test_source_batches_visit_every_sample_once_per_epoch_and_resume_exactly():
    torch.manual_seed(0)
    stream = SourceBatches(batch_size=4)
    stream.start(_source_view())
    drawn = [stream.next(_Loader()).x[:, 0].long().tolist() for _ in range(6)]  # 2 epochs of 4 + 4 + 2
    assert [len(b) for b in drawn] == [4, 4, 2, 4, 4, 2]
    assert sorted(sum(drawn[:3], [])) == list(range(10)) and sorted(sum(drawn[3:], [])) == list(range(10))
    assert sum(drawn[:3], []) != sum(drawn[3:], [])  # a new order each epoch
    saved = {k: v.clone() for k, v in stream.state_dict().items()}
    continued = [stream.next(_Loader()).x.tolist() for _ in range(4)]
    torch.manual_seed(1)  # the global generator does not matter once the stream has started
    restored = SourceBatches(batch_size=4)
    restored.load_state_dict(saved)
    restored.attach(_source_view())
    assert [restored.next(_Loader()).x.tolist() for _ in range(4)] == continued


def test_source_training_data_comes_from_the_past_and_its_absence_names_the_fix():
    from clpeft.experience import Experience

    train = _source_view()
    source = Experience(0, train, None, [0, 1], [0, 1])
    tta = Experience(1, None, train, [], [0, 1])
    tta.past = (source,)
    assert source_training_data(tta, "rmt", "x: 0") is train
    tta.past = (Experience(0, None, None, [0, 1], [0, 1]),)
    with pytest.raises(UserError, match="rmt uses the source training data.*set x: 0"):
        source_training_data(tta, "rmt", "x: 0")


def test_eata_filter_selects_exactly_the_reliable_non_redundant_samples():
    C = 4
    e0 = 0.4 * math.log(C)  # 0.5545
    probs = np.array(
        [
            [0.97, 0.01, 0.01, 0.01],  # H = 0.168: reliable, points at class 0
            [0.01, 0.97, 0.01, 0.01],  # H = 0.168: reliable, class 1
            [0.40, 0.20, 0.20, 0.20],  # H = 1.33: unreliable
            [0.01, 0.01, 0.01, 0.97],  # reliable, class 3
            [0.90, 0.04, 0.03, 0.03],  # H = 0.42: reliable, class 0
        ]
    )
    logits = torch.tensor(np.log(probs), dtype=torch.float32)
    ent = -(probs * np.log(probs)).sum(1)
    f = EATASampleFilter(entropy_margin=e0, redundancy_margin=0.5)
    # first batch: no moving average yet -> the reliable ones; m = their mean
    selected, weights = f.select(logits)
    assert selected.tolist() == list(ent < e0) == [True, True, False, True, True]
    np.testing.assert_allclose(weights.numpy(), np.exp(e0 - ent), rtol=1e-5)
    m = probs[[0, 1, 3, 4]].mean(0)
    np.testing.assert_allclose(f.moving_probs.numpy(), m, rtol=1e-5)
    # second batch: reliable and |cos(m, p)| < 0.5
    m_point = np.array([0.97, 0.01, 0.01, 0.01])
    f.moving_probs = torch.tensor(m_point, dtype=torch.float32)
    cos = probs @ m_point / (np.linalg.norm(probs, axis=1) * np.linalg.norm(m_point))
    expected = (ent < e0) & (np.abs(cos) < 0.5)
    assert expected.tolist() == [False, True, False, True, False]  # class-0 samples are redundant now
    selected, _ = f.select(logits)
    assert selected.tolist() == expected.tolist()
    np.testing.assert_allclose(f.moving_probs.numpy(), 0.9 * m_point + 0.1 * probs[[1, 3]].mean(0), rtol=1e-5)
    # the moving average is state
    g = EATASampleFilter(e0, 0.5)
    g.set_extra_state(f.get_extra_state())
    assert torch.equal(g.moving_probs, f.moving_probs)


def test_batch_gradient_importance_is_the_mean_squared_minibatch_gradient_on_pseudo_labels():
    model = _net()
    use_batch_statistics(batch_norm_layers(model.eval()))
    params = {n: p for n, p in model.named_parameters() if "bn" in n or n.startswith("1.")}
    batches = [_images(6, s) for s in range(3)]
    got = batch_gradient_importance(model, batches, params)
    expected = {n: torch.zeros_like(p) for n, p in params.items()}
    for x in batches:  # the authors' loop: backward on the mini-batch CE to argmax labels
        model.zero_grad()
        out = model(x)
        F.cross_entropy(out, out.argmax(1)).backward()
        for n, p in params.items():
            expected[n] += p.grad**2
    for n in params:
        torch.testing.assert_close(got[n], expected[n] / 3)
    assert sum(float(v.sum()) for v in got.values()) > 0


# ------------------------------------------------------------------ LAME


def _np_lame(probs, feats, knn, max_steps=100):
    """LAME written out: kNN affinity on normalised features, eq. 7 fixed point, energy stop."""
    f = feats / np.linalg.norm(feats, axis=1, keepdims=True)
    d = np.sqrt(((f[:, None] - f[None]) ** 2).sum(-1))
    n = len(f)
    W = np.zeros((n, n))
    for i in range(n):
        order = [j for j in np.argsort(d[i], kind="stable") if j != i][:knn]
        W[i, order] = 1.0
    unary = -np.log(probs + 1e-10)
    z = probs / probs.sum(1, keepdims=True)
    old = np.inf
    for step in range(max_steps):
        pair = W @ z
        a = -unary + pair
        z = np.exp(a - a.max(1, keepdims=True))
        z /= z.sum(1, keepdims=True)
        e = (unary * z - pair * z + z * np.log(np.clip(z, 1e-20, None))).sum()
        if step > 1 and abs(e - old) <= 1e-8 * abs(old):
            break
        old = e
    return z, W


def test_laplacian_adjustment_equals_a_numpy_fixed_point():
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(12, 6))
    probs = rng.dirichlet(np.ones(3), size=12)
    expected, W = _np_lame(probs, feats, knn=3)
    kernel = affinity(torch.tensor(feats, dtype=torch.float32), "knn", 3)
    np.testing.assert_array_equal(kernel.numpy(), W)
    z = laplacian_adjustment(torch.tensor(probs, dtype=torch.float32), kernel)
    np.testing.assert_allclose(z.numpy(), expected, atol=1e-5)
    assert np.abs(expected - probs).max() > 0.05  # the adjustment moved the predictions


def test_lame_with_a_zero_affinity_returns_the_model_probabilities():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]])
    z = laplacian_adjustment(probs, torch.zeros(2, 2))
    torch.testing.assert_close(z, probs, atol=1e-6, rtol=0)
