"""Test-time adaptation strategies, driven through their hooks on a source model trained here.

The source model is a small BatchNorm CNN trained on clean scikit-learn digits; the test stream
is the held-out digits with Gaussian noise. Each method is checked against an independent
computation: the authors' recipe written out in plain PyTorch (Tent), numpy (EATA's loss),
hand-applied formulas (CoTTA's teacher and restore, RMT's ensemble), or the strategy's own
components applied by hand (LAME, Dual Teacher).
"""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn

from clpeft.backbones.cnn import CNNBackbone
from clpeft.components.tta.augment_average import augmentation_average
from clpeft.components.tta.laplacian_adjustment import affinity, laplacian_adjustment
from clpeft.components.tta.losses import entropy, multi_view_contrastive_loss
from clpeft.components.tta.online_adaptation import classifier
from clpeft.data import ArrayDataset, DataView
from clpeft.data_access import DataAccess
from clpeft.experience import Experience
from clpeft.registry import strategies
from clpeft.strategy import Strategy

WIDTHS = [16, 32]
TTA_METHODS = ["source", "bn_adapt", "tent", "eata", "cotta", "rmt", "lame", "dual_teacher"]


@pytest.fixture(scope="module")
def source():
    """A CNN + linear head trained on clean digits; noisy held-out digits as the test stream."""
    torch.manual_seed(0)
    d = load_digits()
    x = torch.from_numpy((d.images * 255 / 16).round().astype("uint8")).unsqueeze(1)
    y = torch.from_numpy(d.target)
    backbone = CNNBackbone((1, 8, 8), widths=WIDTHS)
    model = classifier(backbone, nn.Linear(backbone.feature_dim, 10))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(6):
        model.train()
        perm = torch.randperm(1400)
        for i in range(0, 1400, 64):
            idx = perm[i : i + 64]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    noise = torch.randn(x[1400:].shape, generator=torch.Generator().manual_seed(1)) * 80
    noisy = (x[1400:].float() + noise).clamp(0, 255).round().to(torch.uint8)
    train = DataView.of(ArrayDataset(x[:1400], y[:1400], "digits/train"))
    test = DataView.of(ArrayDataset(noisy, y[1400:], "digits/noisy"))
    source_exp = Experience(0, train, None, list(range(10)), list(range(10)))
    tta_exp = Experience(1, None, test, [], list(range(10)))
    tta_exp.past = (source_exp,)  # as the engine links a stream
    return {
        "backbone": backbone.state_dict(),
        "head": model[1].state_dict(),
        "noisy": noisy,
        "y": y[1400:],
        "source_exp": source_exp,
        "tta_exp": tta_exp,
    }


def _make(name: str, source, start: bool = True, **params):
    """The strategy with the trained source weights, after source training (and, with
    ``start``, at the beginning of the first test-time experience)."""
    torch.manual_seed(123)
    strategy = strategies.get(name)(CNNBackbone((1, 8, 8), widths=WIDTHS), **params)
    strategy.before_experience(source["source_exp"])
    strategy.backbone.load_state_dict(source["backbone"])
    strategy.head.load_state_dict(source["head"])
    strategy.attach(DataAccess(torch.device("cpu"), None, strategy.backbone, 64))
    strategy.after_experience(source["source_exp"])
    if start:
        strategy.before_experience(source["tta_exp"])
    return strategy


def _batches(source, n: int = 3, size: int = 64):
    return [source["noisy"][i * size : (i + 1) * size] for i in range(n)]


def _adapt(strategy, x):
    with torch.enable_grad():
        return strategy.adapt(x)


def _source_model(source) -> nn.Sequential:
    backbone = CNNBackbone((1, 8, 8), widths=WIDTHS)
    backbone.load_state_dict(source["backbone"])
    head = nn.Linear(backbone.feature_dim, 10)
    head.load_state_dict(source["head"])
    return classifier(backbone, head)


def _is_bn(name: str) -> bool:
    return ".bn" in name or "stem.1" in name or "shortcut.1" in name


# ------------------------------------------------------------------ contract


@pytest.mark.parametrize("name", TTA_METHODS)
def test_declares_tta_and_cites_the_paper(name):
    cls = strategies.get(name)
    assert cls.supported_scenarios == ("test_time_adaptation",)
    first = cls.__doc__.strip().splitlines()[0]
    assert any(ch.isdigit() for ch in first) and "(" in first  # "... (Authors Year)."


def test_norm_methods_refuse_a_backbone_without_norm_layers():
    from clpeft.backbones.mlp import MLPBackbone
    from clpeft.errors import UserError

    with pytest.raises(UserError):
        strategies.get("tent")(MLPBackbone((1, 8, 8), hidden=[8]))


GRADIENT_METHODS = {"tent": "norm", "eata": "norm", "cotta": "all", "rmt": "all", "dual_teacher": "norm"}


@pytest.mark.parametrize("name", GRADIENT_METHODS)
def test_shared_optimizer_options_are_flat_keys_built_into_one_options_object(name):
    """YAML's flat keys (and Python's keywords) become the method's AdaptationOptions: the method's own
    defaults where unset, one validation for every method."""
    import clpeft.config
    from clpeft.errors import UserError

    cls = strategies.get(name)
    fields = clpeft.config.schema_of(cls, "strategy").model_fields
    assert {"optimizer", "lr", "momentum", "weight_decay", "params"} <= set(fields)
    assert fields["params"].default == GRADIENT_METHODS[name]
    spec = clpeft.config.resolve(
        {
            "scenario": {"name": "test_time_adaptation", "dataset": "sklearn_digits"},
            "backbone": {"name": "cnn"},
            "strategy": {"name": name, "optimizer": "sgd", "lr": 0.02, "weight_decay": 1e-4},
        }
    ).strategy
    strategy = spec.build(backbone=CNNBackbone((1, 8, 8), widths=WIDTHS))
    optimizer = strategy.adaptation.optimizer
    assert (optimizer.kind, optimizer.lr, optimizer.momentum, optimizer.weight_decay) == ("sgd", 0.02, 0.9, 1e-4)
    assert strategy.adaptation.params == GRADIENT_METHODS[name]
    with pytest.raises(UserError, match="strategy.momentum: input should be less than 1"):
        clpeft.config.resolve(
            {
                "scenario": {"name": "test_time_adaptation", "dataset": "sklearn_digits"},
                "backbone": {"name": "cnn"},
                "strategy": {"name": name, "momentum": 1.5},
            }
        )
    with pytest.raises(UserError, match="^lr: input should be greater than 0"):
        cls(CNNBackbone((1, 8, 8), widths=WIDTHS), lr=-1.0)


# ------------------------------------------------------------------ source, bn_adapt


def test_source_predicts_with_running_statistics_and_changes_nothing(source):
    s = _make("source", source)
    s.train()  # adapt must not depend on the mode the engine left
    x = _batches(source, 1)[0]
    out = _adapt(s, x)
    with torch.no_grad():
        expected = _source_model(source).eval()(x)
    torch.testing.assert_close(out, expected)
    assert all(torch.equal(v, source["backbone"][k]) for k, v in s.backbone.state_dict().items())


def test_bn_adapt_normalises_with_test_batch_statistics_without_updates(source):
    s = _make("bn_adapt", source)
    x = _batches(source, 1)[0]
    out = _adapt(s, x)
    reference = _source_model(source).eval()
    for m in reference.modules():  # BatchNorm without running statistics: F.batch_norm on batch stats
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean = m.running_var = None
    with torch.no_grad():
        torch.testing.assert_close(out, reference(x))
        source_out = _source_model(source).eval()(x)
    assert (out - source_out).abs().max() > 1e-2
    for k, v in s.backbone.state_dict().items():  # parameters and running statistics untouched
        assert torch.equal(v, source["backbone"][k]), k
    assert _adapt(s, x).requires_grad is False


# ------------------------------------------------------------------ tent


def _tent_reference(source, batches, lr=1e-3):
    """Tent as in the authors' code: train mode, BN without running stats, Adam on BN affine."""
    model = _source_model(source).train()
    model.requires_grad_(False)
    params = []
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.requires_grad_(True)
            m.track_running_stats = False
            m.running_mean = m.running_var = None
            params += [m.weight, m.bias]
    opt = torch.optim.Adam(params, lr=lr, betas=(0.9, 0.999))
    outs = []
    for x in batches:
        out = model(x)
        loss = -(out.softmax(1) * out.log_softmax(1)).sum(1).mean(0)
        loss.backward()
        opt.step()
        opt.zero_grad()
        outs.append(out.detach())
    return model, outs


def test_tent_matches_the_reference_and_updates_only_batchnorm_affine_parameters(source):
    batches = _batches(source, 4)
    s = _make("tent", source, lr=5e-3)
    outs = [_adapt(s, x) for x in batches]
    reference, ref_outs = _tent_reference(source, batches, lr=5e-3)
    for a, b in zip(outs, ref_outs):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    ref = dict(reference.named_parameters())
    changed = set()
    for name, p in s.backbone.named_parameters():
        torch.testing.assert_close(p, ref[f"0.{name}"], rtol=1e-4, atol=1e-6)
        if not torch.equal(p, source["backbone"][name]):
            changed.add(name)
    bn_affine = {n for n, _ in s.backbone.named_parameters() if _is_bn(n)}
    assert changed == bn_affine  # every BN gamma/beta moved, nothing else did
    for name, buf in s.backbone.named_buffers():  # running statistics untouched
        assert torch.equal(buf, source["backbone"][name])
    assert all(torch.equal(v, source["head"][k]) for k, v in s.head.state_dict().items())


def test_tent_lowers_the_entropy_of_a_shifted_batch(source):
    s = _make("tent", source, lr=1e-2)
    x = _batches(source, 1)[0]
    first = entropy(_adapt(s, x)).mean().item()
    for _ in range(10):
        last = entropy(_adapt(s, x)).mean().item()
    assert last < 0.8 * first


# ------------------------------------------------------------------ eata


def _np_entropy(logits):
    z = logits - logits.max(1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(1, keepdims=True))
    return -(np.exp(logp) * logp).sum(1), np.exp(logp)


def test_eata_loss_is_weighted_entropy_of_selected_samples_plus_fisher_term(source, monkeypatch):
    alpha = 1e6  # importances are ~1e-6 here
    s = _make("eata", source, fisher_alpha=alpha, fisher_size=256, redundancy_margin=0.9, lr=1e-2)
    assert s.penalty.terms and set(s.penalty.terms[0]) == {f"backbone.{n}" for n, _ in s.backbone.named_parameters() if _is_bn(n)}
    losses = []
    step = s.adaptation.step
    monkeypatch.setattr(s.adaptation, "step", lambda loss: (losses.append(loss.item()), step(loss)))
    expected, penalties = [], []
    for x in _batches(source, 3):
        with torch.no_grad():
            logits = copy.deepcopy(s).predict(x).double().numpy()
            params = {n: p.detach().double().numpy() for n, p in s.named_parameters()}
        moving = None if s.filter.moving_probs is None else s.filter.moving_probs.double().numpy()
        ent, probs = _np_entropy(logits)
        e0 = 0.4 * math.log(10)
        keep = ent < e0
        if moving is not None:
            cos = probs @ moving / (np.linalg.norm(probs, axis=1) * np.linalg.norm(moving))
            keep &= np.abs(cos) < 0.9
        penalty = sum(float((f.double().numpy() * (params[n] - a.double().numpy()) ** 2).sum()) for n, (a, f) in s.penalty.terms[0].items())
        if keep.any():
            expected.append(float((np.exp(e0 - ent[keep]) * ent[keep]).mean()) + alpha * penalty)
            penalties.append(alpha * penalty)
        _adapt(s, x)
    assert len(losses) == len(expected) >= 2
    np.testing.assert_allclose(losses, expected, rtol=1e-5)
    assert penalties[0] == 0 and penalties[-1] > 1e-3 * expected[-1]  # the Fisher term is visible in the check


def test_eata_takes_no_step_when_no_sample_is_reliable(source):
    s = _make("eata", source, entropy_factor=1e-9, fisher_alpha=0.0)
    before = copy.deepcopy(s.state_dict())
    for x in _batches(source, 2):
        _adapt(s, x)
    for k, v in s.backbone.state_dict().items():
        assert torch.equal(v, before[f"backbone.{k}"])


def test_eata_fisher_term_keeps_parameters_closer_to_the_source(source):
    """The anchored run drifts less, and ever less relative to the free one as adaptation goes on
    (the penalty holds it near the source while the free run keeps moving). Six rounds: the
    ratio after three was 0.44-0.59 depending on the CPU's float32 trajectory, after six ~0.39."""

    def drift(alpha):
        s = _make("eata", source, fisher_alpha=alpha, fisher_size=256, optimizer="sgd", lr=0.05, redundancy_margin=1.0)
        per_round = []
        for _ in range(6):
            for x in _batches(source, 3):
                _adapt(s, x)
            per_round.append(sum(float((p.detach() - source["backbone"][n]).pow(2).sum()) for n, p in s.backbone.named_parameters()))
        return per_round

    free, anchored = drift(0.0), drift(1e6)  # importances here are ~1e-6
    ratios = [a / f for a, f in zip(anchored, free)]
    assert free[-1] > 0 and ratios[-1] < 0.5, ratios
    assert all(later < earlier for earlier, later in zip(ratios, ratios[1:])), ratios


# ------------------------------------------------------------------ cotta


def _params(module):
    return {n: p.detach().clone() for n, p in module.named_parameters()}


def test_cotta_teacher_is_the_ema_of_the_updated_student_and_predicts(source):
    m = 0.9
    s = _make("cotta", source, ema_momentum=m, restore_p=0.0, confidence_threshold=0.0)
    x = _batches(source, 1)[0]
    teacher_before = _params(s.teacher.model)
    with torch.no_grad():
        expected_out = copy.deepcopy(s.teacher)(x)
    out = _adapt(s, x)
    torch.testing.assert_close(out, expected_out)
    student = _params(classifier(s.backbone, s.head))
    moved = 0
    for n, p in s.teacher.model.named_parameters():
        torch.testing.assert_close(p, m * teacher_before[n] + (1 - m) * student[n], rtol=1e-6, atol=1e-7)
        moved += not torch.equal(p, teacher_before[n])
    assert moved > 0


def test_cotta_restore_one_returns_the_student_to_the_source_bitwise(source):
    s = _make("cotta", source, restore_p=1.0, confidence_threshold=0.0, lr=1e-2, ema_momentum=0.5)
    free = _make("cotta", source, restore_p=0.0, confidence_threshold=0.0, lr=1e-2, ema_momentum=0.5)
    x = _batches(source, 1)[0]
    _adapt(s, x)
    _adapt(free, x)
    for n, p in s.backbone.named_parameters():
        assert torch.equal(p, source["backbone"][n])
    # the teacher learned from the student before the restore (same as without restore)
    for (_, a), (_, b) in zip(s.teacher.named_parameters(), free.teacher.named_parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-7)
    assert any(
        not torch.equal(p, source["backbone"][n[len("model.0.") :]]) for n, p in s.teacher.named_parameters() if n.startswith("model.0.")
    )
    assert any(not torch.equal(p, source["backbone"][n]) for n, p in free.backbone.named_parameters())


def test_cotta_averages_augmentations_when_the_anchor_is_unsure(source):
    s = _make("cotta", source, confidence_threshold=1.0, n_augmentations=4, flip=0.0)
    x = _batches(source, 1)[0]
    teacher = copy.deepcopy(s.teacher)
    torch.manual_seed(7)
    out = _adapt(s, x)
    torch.manual_seed(7)
    with torch.no_grad():
        expected = augmentation_average(teacher, x, s.augment, 4)
        plain = teacher(x)
    torch.testing.assert_close(out, expected)
    assert (out - plain).abs().max() > 1e-3


# ------------------------------------------------------------------ rmt, lame, dual teacher


def test_rmt_predicts_the_student_teacher_ensemble_and_updates_the_teacher(source):
    s = _make("rmt", source, ema_momentum=0.5, flip=0.0, warmup_samples=128)
    x = _batches(source, 1)[0]
    snapshot = copy.deepcopy(s)
    snapshot.adaptation.begin_batch(snapshot)
    with torch.no_grad():
        expected = classifier(snapshot.backbone, snapshot.head)(x) + snapshot.teacher(x)
    out = _adapt(s, x)
    torch.testing.assert_close(out, expected)
    assert any(not torch.equal(a, b) for a, b in zip(s.teacher.parameters(), snapshot.teacher.parameters()))


def _sce(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    return -0.5 * (q.softmax(1) * p.log_softmax(1)).sum(1) - 0.5 * (p.softmax(1) * q.log_softmax(1)).sum(1)


def test_rmt_prototypes_are_the_source_models_class_means_and_warm_up_ramps_the_teacher(source, monkeypatch):
    passes = []  # the prototype pass: shuffled batches of the source data, as the reference's loader
    batches = Strategy.batches

    def recording(self, view, batch_size=None, shuffle=False, shard=False):
        for batch in batches(self, view, batch_size, shuffle, shard):
            if shuffle:
                passes.append(batch)
            yield batch

    monkeypatch.setattr(Strategy, "batches", recording)
    s = _make("rmt", source, warmup_samples=5 * 64, lr=1e-3)
    model = _source_model(source)
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    for m in norms:  # RMT's source pass uses batch statistics, as at test time
        m.track_running_stats, m.training = False, True
    y = torch.cat([b.y for b in passes])
    assert len(passes) == math.ceil(1400 / 64) and len(y) == 1400
    assert not torch.equal(y, source["source_exp"].train.load()[1])  # shuffled
    with torch.no_grad():
        feats = torch.cat([model[0](b.x) for b in passes]).double()
    expected = torch.stack([feats[y == c].mean(0) for c in range(10)])
    torch.testing.assert_close(s.contrast.prototypes.means(), expected)
    assert int(s.teacher.num_updates) == 5 and int(s.source_batches.drawn) == 5
    assert s.adaptation.optimizer._optimizer.param_groups[0]["lr"] == pytest.approx(1e-3)
    moved = [not torch.equal(p, source["backbone"][n]) for n, p in s.backbone.named_parameters()]
    assert any(moved)  # warm-up trained the student before the first test batch
    teacher = dict(s.teacher.model[0].named_parameters())
    assert all(not torch.equal(teacher[n], p) for n, p in s.backbone.named_parameters() if not torch.equal(p, source["backbone"][n]))


def test_rmt_loss_is_weighted_self_training_contrastive_and_source_cross_entropy(source, monkeypatch):
    s = _make("rmt", source, warmup_samples=128, lambda_ce_trg=1.5, lambda_cont=0.7, lambda_ce_src=0.3)
    s.augment = lambda images: images.flip(-1)
    reference = copy.deepcopy(s)
    losses = []
    monkeypatch.setattr(s.adaptation, "step", lambda loss: losses.append(loss.detach()))
    x = _batches(source, 1)[0]
    _adapt(s, x)

    r = reference
    r.adaptation.begin_batch(r)
    src = r.source_batches.next(r)
    with torch.no_grad():
        f, f_aug = r.backbone(x), r.backbone(x.flip(-1))
        q = r.teacher(x)
        self_training = (0.5 * _sce(r.head(f), q) + 0.5 * _sce(r.head(f_aug), q)).mean()
        protos = r.contrast.prototypes.means().float()
        nearest = torch.stack([F.cosine_similarity(protos, fi[None], dim=1).argmax() for fi in f])
        z = F.normalize(r.contrast.projector(torch.stack([protos[nearest], f, f_aug], 1)), dim=-1)
        contrastive = multi_view_contrastive_loss(z, 0.1)
        source_ce = F.cross_entropy(r.head(r.backbone(src.x)), src.y)
    torch.testing.assert_close(losses[0], 1.5 * self_training + 0.7 * contrastive + 0.3 * source_ce)
    assert 0 < contrastive and 0 < source_ce


def test_rmt_optimises_the_projection_head_with_the_model(source):
    s = _make("rmt", source, warmup_samples=0)
    head_before = copy.deepcopy(s.contrast.projector.state_dict())
    _adapt(s, _batches(source, 1)[0])
    assert all(not torch.equal(v, head_before[k]) for k, v in s.contrast.projector.state_dict().items())
    core = _make("rmt", source, warmup_samples=0, lambda_cont=0.0, lambda_ce_src=0.0)
    assert core.contrast.prototypes.n_classes == 0 and int(core.source_batches.drawn) == 0


def test_rmt_loads_checkpoints_written_before_its_prototype_contrast_moved_into_a_component(source):
    s = _make("rmt", source, warmup_samples=0)
    _adapt(s, _batches(source, 1)[0])
    old = {k.replace("contrast.", "", 1) if k.startswith("contrast.") else k: v for k, v in s.state_dict().items()}
    assert "prototypes.counts" in old and "projector.0.weight" in old
    fresh = _make("rmt", source, warmup_samples=0)
    fresh.load_state_dict(old)
    for key, value in s.state_dict().items():
        torch.testing.assert_close(fresh.state_dict()[key], value)


def test_lame_adjusts_source_outputs_without_updates(source):
    s = _make("lame", source, affinity="knn", knn=3)
    x = _batches(source, 1)[0]
    out = _adapt(s, x)
    model = _source_model(source).eval()
    with torch.no_grad():
        feats = model[0](x)
        z = laplacian_adjustment(model[1](feats).softmax(1), affinity(feats, "knn", 3))
    torch.testing.assert_close(out.exp(), z, rtol=1e-4, atol=1e-6)
    assert all(torch.equal(v, source["backbone"][k]) for k, v in s.backbone.state_dict().items())
    assert (out.argmax(1) != model[1](feats).argmax(1)).any()


def test_lame_with_batch_statistics_adjusts_the_outputs_of_test_batch_normalised_features(source):
    s = _make("lame", source, affinity="knn", knn=3, batch_statistics=True)
    x = _batches(source, 1)[0]
    out = _adapt(s, x)
    model = _source_model(source).eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.track_running_stats, m.training = False, True
    with torch.no_grad():
        feats = model[0](x)
        z = laplacian_adjustment(model[1](feats).softmax(1), affinity(feats, "knn", 3))
    torch.testing.assert_close(out.exp(), z, rtol=1e-4, atol=1e-6)
    assert all(torch.equal(v, source["backbone"][k]) for k, v in s.backbone.state_dict().items())


def test_dual_teacher_predicts_with_the_teacher_on_duty_and_switches(source):
    s = _make("dual_teacher", source, period=2, confidence_threshold=0.5, flip=0.0)
    duty = []
    for x in _batches(source, 5, 32):
        idle = 1 - s.teachers.active
        idle_before = _params(s.teachers.teachers[idle])
        with torch.no_grad():
            expected = copy.deepcopy(s.teachers.teacher)(x)
        duty.append(s.teachers.active)
        torch.testing.assert_close(_adapt(s, x), expected)
        assert all(torch.equal(p, idle_before[n]) for n, p in s.teachers.teachers[idle].named_parameters())
    assert duty == [0, 0, 1, 1, 0]
    assert any(not torch.equal(p, source["backbone"][n]) for n, p in s.backbone.named_parameters())


# ------------------------------------------------------------------ state and reset


@pytest.mark.parametrize("name", ["tent", "eata", "cotta", "rmt", "dual_teacher"])
def test_state_dict_round_trip_continues_identically(source, name):
    params = {"eata": {"fisher_size": 128}, "rmt": {"warmup_samples": 128}}.get(name, {})
    s = _make(name, source, **params)
    batches = _batches(source, 3)
    for x in batches[:2]:
        _adapt(s, x)
    restored = _make(name, source, start=False, **params)
    restored.load_state_dict(copy.deepcopy(s.state_dict()))
    restored.before_experience(source["tta_exp"])
    torch.manual_seed(5)
    a = _adapt(s, batches[2])
    torch.manual_seed(5)
    b = _adapt(restored, batches[2])
    assert torch.equal(a, b)
    for (n, p), (_, q) in zip(s.state_dict().items(), restored.state_dict().items()):
        if isinstance(p, torch.Tensor):
            assert torch.equal(p, q), n


@pytest.mark.parametrize("name", ["tent", "cotta"])
def test_loading_the_source_state_restarts_adaptation_from_the_source(source, name):
    s = _make(name, source, start=False)
    source_state = copy.deepcopy(s.state_dict())
    s.before_experience(source["tta_exp"])
    batches = _batches(source, 3)
    for x in batches[:2]:
        _adapt(s, x)
    s.load_state_dict(source_state)  # what a reset_each_domain stream does between domains
    s.before_experience(source["tta_exp"])
    fresh = _make(name, source)
    torch.manual_seed(9)
    a = _adapt(s, batches[2])
    torch.manual_seed(9)
    b = _adapt(fresh, batches[2])
    assert torch.equal(a, b)


def test_adaptation_lowers_error_on_the_noisy_stream(source):
    errors = {}
    for name in ["source", "bn_adapt", "tent"]:
        s = _make(name, source)
        wrong = sum(int((_adapt(s, x).argmax(1) != source["y"][i * 64 : (i + 1) * 64]).sum()) for i, x in enumerate(_batches(source, 6)))
        errors[name] = wrong / (6 * 64)
    assert errors["bn_adapt"] < errors["source"] and errors["tent"] < errors["source"]


# ------------------------------------------------------------------ through the engine


def _tta_run(tmp_path, name: str, strategy: dict, **scenario) -> dict:
    import clpeft.config
    import clpeft.engine

    cfg = {
        "seed": 0,
        "scenario": {
            "name": "test_time_adaptation",
            "dataset": "sklearn_digits",
            "corruptions": ["gaussian_noise"],
            "severity": 5,
            "root": str(tmp_path / "data"),
            **scenario,
        },
        "backbone": {"name": "cnn", "widths": WIDTHS},
        "strategy": strategy,
        "train": {"epochs": 6, "batch_size": 64, "lr": 0.1, "optimizer": "sgd", "momentum": 0.9},
        "eval": {"baseline": False},
        "logging": {"tensorboard": False, "progress": "never"},
    }
    return clpeft.engine.Engine(clpeft.config.resolve(cfg), tmp_path / name, device="cpu").run()


def test_engine_stream_tent_eata_and_bn_adapt_lower_the_error_of_the_source_model(tmp_path):
    """Digits under contrast and defocus blur at severity 5 (Gaussian noise barely hurts 8x8
    digits: about 2% error), continual mode: every method beats the unadapted source model."""
    stream = {"corruptions": ["contrast", "defocus_blur"], "train_per_class": 80, "test_per_class": 30}
    # eata weighs its parameters on the source data, so its run trains the source model; the
    # others load that source model (its backbone and head) from the run directory
    errors = {"eata": _tta_run(tmp_path, "eata", {"name": "eata", "fisher_size": 256}, **stream)["metrics"]["error_mean"]}
    for strategy in [{"name": "source"}, {"name": "bn_adapt"}, {"name": "tent", "lr": 5e-3}]:
        result = _tta_run(tmp_path, strategy["name"], strategy, source_checkpoint=str(tmp_path / "eata"), **stream)
        errors[strategy["name"]] = result["metrics"]["error_mean"]
    assert errors["source"] > 0.5, errors  # the shift hurts the source model
    for name in ["bn_adapt", "tent", "eata"]:
        assert errors[name] < 0.5 * errors["source"], errors
