"""ROID, RPL, CMF and SANTA driven through their hooks on the digits source model of ``test_tta_methods.py``,
and through the engine on every stream of the ``test_time_adaptation`` scenario.

The source model (a small BatchNorm CNN trained on clean scikit-learn digits) and the noisy test
stream are that file's fixture. Checked against independent computations (the loss written out
from its formula, the weight ensembling and the prior correction by hand) and behaviours: a saved
state resumes identically, a loaded source state starts over, and each method runs the
continual, gradual, mixed-domain and Dirichlet label-shift streams end to end.
"""
# ruff: noqa: F811  (the tests request the imported module fixture ``source`` by name)

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from test_tta_methods import _adapt, _batches, _make, source  # noqa: F401  (source: that module's fixture)
from torch import nn

import clpeft.config
import clpeft.engine
from clpeft.backbones.mlp import MLPBackbone
from clpeft.components.tta.certainty_diversity import prior_correction, soft_likelihood_ratio
from clpeft.components.tta.contrastive_memory import ContrastiveMemory
from clpeft.components.tta.losses import multi_view_contrastive_loss
from clpeft.components.tta.model_fusion import ModelFusion
from clpeft.components.tta.online_adaptation import classifier
from clpeft.components.tta.prototype_contrast import PrototypeContrast
from clpeft.errors import UserError
from clpeft.experience import Experience
from clpeft.registry import strategies

METHODS = ["roid", "rpl", "cmf", "santa", "adacontrast"]
DIGITS = {"flip": 0.0}  # no horizontal flips of digits
OPTIONS = {"roid": DIGITS, "rpl": {}, "cmf": DIGITS, "santa": {**DIGITS, "projection_dim": 16}, "adacontrast": {"queue_size": 256}}


def _params(strategy) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in classifier(strategy.backbone, strategy.head).named_parameters()}


def _source_params(source) -> dict[str, torch.Tensor]:
    return {**{f"0.{k}": v for k, v in source["backbone"].items()}, **{f"1.{k}": v for k, v in source["head"].items()}}


# ------------------------------------------------------------------ contract


@pytest.mark.parametrize("name", METHODS)
def test_declares_tta_and_cites_the_paper(name):
    cls = strategies.get(name)
    assert cls.supported_scenarios == ("test_time_adaptation",)
    first = cls.__doc__.strip().splitlines()[0]
    assert any(ch.isdigit() for ch in first) and "(" in first


@pytest.mark.parametrize("name", [m for m in METHODS if m != "adacontrast"])  # AdaContrast adapts every layer
def test_refuses_a_backbone_without_norm_layers(name):
    with pytest.raises(UserError, match="normalisation layers"):
        strategies.get(name)(MLPBackbone((1, 8, 8), hidden=[8]))


# ------------------------------------------------------------------ roid


def test_roid_loss_is_the_weighted_soft_likelihood_ratio_and_consistency(source, monkeypatch):
    """The first batch's loss, written out from the paper's formulas (min-max normalised
    diversity against the uniform prior and certainty, ``exp(w_div w_cert / T)``, samples below
    the mean diversity left out, SLR and the symmetric cross-entropy to the augmented view, over
    the batch size), equals the strategy's; some samples, not all, are left out."""
    s = _make("roid", source, **DIGITS)
    losses = []
    step = s.adaptation.step
    monkeypatch.setattr(s.adaptation, "step", lambda loss: (losses.append(loss.detach()), step(loss)))
    x = _batches(source, 1)[0]
    net = copy.deepcopy(classifier(s.backbone, s.head))
    with torch.no_grad():
        logits = net(x)
    p = logits.softmax(1).double()
    diversity = 1 - (p @ torch.full((10,), 0.1, dtype=torch.float64)) / (p.norm(dim=1) * np.sqrt(0.1**2 * 10))
    diversity = (diversity - diversity.min()) / (diversity.max() - diversity.min())
    h = -(p * p.log()).sum(1)
    certainty = (h.max() - h) / (h.max() - h.min())
    kept = diversity >= diversity.mean()
    w = torch.exp(diversity * certainty * 3) * kept
    q = p.clamp(max=0.99)
    slr = -(q * torch.log(q / (1 - q) + 1e-5)).sum(1)
    assert 0 < int(kept.sum()) < len(x)
    with torch.no_grad():  # one augmentation of the kept samples (their own batch statistics)
        torch.manual_seed(5)
        pa = net(s.loss.augment(x[kept])).softmax(1).double()
    sce = -0.5 * (p[kept] * pa.log()).sum(1) - 0.5 * (pa * p[kept].log()).sum(1)
    torch.manual_seed(5)
    out = _adapt(s, x)
    expected = ((slr * w)[kept].sum() + (sce * w[kept]).sum()) / 64
    torch.testing.assert_close(losses[0].double(), expected, rtol=1e-4, atol=1e-6)
    prior = p.mean(0)
    smooth = max(1 / 64, 1 / 10) / prior.max()
    torch.testing.assert_close(out.double(), logits.double() * (prior + smooth) / (1 + 10 * smooth), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(s.loss.class_probs.double(), 0.9 * 0.1 + 0.1 * prior, rtol=1e-5, atol=1e-7)


def test_roid_weight_ensembling_pulls_the_adapted_weights_to_the_source(source):
    """``momentum_src: 0`` puts the source weights back after every step (bitwise); 1 leaves the
    step alone; the default 0.99 lands 1 % of the way back to the source from the stepped weights."""
    x = _batches(source, 1)[0]
    expected = _source_params(source)
    back = _make("roid", source, momentum_src=0.0, **DIGITS)
    torch.manual_seed(0)
    _adapt(back, x)
    assert all(torch.equal(p, expected[n]) for n, p in _params(back).items())
    free, blended = _make("roid", source, momentum_src=1.0, **DIGITS), _make("roid", source, **DIGITS)
    for s in (free, blended):
        torch.manual_seed(0)
        _adapt(s, x)
    stepped, after = _params(free), _params(blended)
    moved = [n for n in stepped if not torch.equal(stepped[n], expected[n])]
    assert moved and all(".bn" in n or "stem.1" in n or "shortcut.1" in n for n in moved)
    for n in moved:
        torch.testing.assert_close(after[n], 0.99 * stepped[n] + 0.01 * expected[n], rtol=1e-6, atol=1e-7)


def test_soft_likelihood_ratio_and_prior_correction_formulas():
    """SLR clips probabilities at 0.99; the prior correction leaves a batch with a uniform prior's
    argmax unchanged and scales each class by ``(pi_c + s) / (1 + s C)``."""
    logits = torch.tensor([[8.0, 0.0, 0.0], [0.0, 1.0, 0.5]])
    p = logits.softmax(1).clamp(max=0.99)
    torch.testing.assert_close(soft_likelihood_ratio(logits), -(p * torch.log(p / (1 - p) + 1e-5)).sum(1))
    prior = logits.softmax(1).mean(0)
    s = 0.5 / prior.max()
    torch.testing.assert_close(prior_correction(logits), logits * (prior + s) / (1 + 3 * s))


# ------------------------------------------------------------------ rpl


def test_rpl_loss_is_the_generalized_cross_entropy_of_the_hard_pseudo_labels(source, monkeypatch):
    """Each batch's loss is ``mean (1 - max_c p_c^q) / q`` written out (``q`` 0.8 and 0.5); the
    returned prediction is the one before the step, and only the BatchNorm affine parameters move."""
    for q in (0.8, 0.5):
        s = _make("rpl", source, q=q, lr=1e-2)
        losses = []
        step = s.adaptation.step
        monkeypatch.setattr(s.adaptation, "step", lambda loss: (losses.append(loss.detach()), step(loss)))
        before = _params(s)
        for x in _batches(source, 2):
            with torch.no_grad():
                expected_out = classifier(s.backbone, s.head)(x)
            out = _adapt(s, x)
            torch.testing.assert_close(out, expected_out)
            p_max = expected_out.double().softmax(1).max(1).values
            torch.testing.assert_close(losses[-1].double(), ((1 - p_max**q) / q).mean(), rtol=1e-5, atol=1e-7)
        moved = [n for n, p in _params(s).items() if not torch.equal(p, before[n])]
        assert moved and all(".bn" in n or "stem.1" in n or "shortcut.1" in n for n in moved)


# ------------------------------------------------------------------ cmf


def test_model_fusion_is_the_filter_written_out():
    """Three fusions of a linear layer (200 adapted weights, ``q`` 10 per 38,400: the gain falls
    below 1 and is clipped at 0.89 on the third), against the filter computed by hand in float64: hidden
    ``h <- beta (alpha h + (1 - alpha) theta_0) + (1 - beta) theta``, ``theta <- gamma theta + (1 - gamma) h``."""
    torch.manual_seed(0)
    model = nn.Linear(10, 20, bias=False)
    fusion = ModelFusion(model, alpha=0.9, gamma=0.8, q=10.0)
    fusion.capture(model)
    theta_0 = model.weight.detach().double().clone()
    h, v = theta_0.clone(), 0.0
    q = 10.0 * 200 / 38400
    betas = []
    for _ in range(3):
        with torch.no_grad():
            model.weight.add_(torch.randn(20, 10) * 0.1)  # an optimizer step
        theta = model.weight.detach().double()
        v = 0.81 * v + q
        beta = max((1 - q) / (v + 1 - q), 0.89)
        v *= beta
        h = beta * (0.9 * h + 0.1 * theta_0) + (1 - beta) * theta
        expected = 0.8 * theta + 0.2 * h
        fusion.fuse(model, ["weight"])
        betas.append(beta)
        torch.testing.assert_close(model.weight.double(), expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(fusion.hidden.weight.double(), h, rtol=1e-5, atol=1e-6)
        assert float(fusion.variance) == pytest.approx(v) and fusion.beta == pytest.approx(beta)
    assert betas[0] > betas[1] > 0.89 == betas[2], betas


def test_cmf_without_fusion_is_roid_without_ensembling(source):
    """``gamma: 1`` keeps the adapted weights out of the fusion: CMF then takes ROID's steps (with
    ``momentum_src: 1``) exactly, batch after batch; the default ``gamma`` moves them."""
    batches = _batches(source, 3)
    roid, cmf, fused = (
        _make("roid", source, momentum_src=1.0, **DIGITS),
        _make("cmf", source, gamma=1.0, **DIGITS),
        _make("cmf", source, q=50.0, **DIGITS),
    )
    for i, x in enumerate(batches):
        outputs = []
        for s in (roid, cmf, fused):
            torch.manual_seed(i)
            outputs.append(_adapt(s, x))
        assert torch.equal(outputs[0], outputs[1])
    assert all(torch.equal(p, q) for p, q in zip(_params(roid).values(), _params(cmf).values()))
    assert not all(torch.equal(p, q) for p, q in zip(_params(roid).values(), _params(fused).values()))


# ------------------------------------------------------------------ santa


def test_prototype_contrast_is_the_multi_view_loss_of_the_nearest_prototype():
    """Prototypes are the class means (the pass stops after the batch that passes ``limit``);
    the loss is the multi-view contrastive loss of (nearest prototype by cosine, features,
    augmented features) through the head, written out here."""
    torch.manual_seed(0)
    contrast = PrototypeContrast(6, projection_dim=8, temperature=0.2)
    features, labels = torch.randn(30, 6), torch.arange(30) % 3
    contrast.compute_prototypes([(features[:10], labels[:10]), (features[10:], labels[10:])], 3)
    means = torch.stack([features[labels == c].mean(0) for c in range(3)])
    torch.testing.assert_close(contrast.prototypes.means().float(), means)
    contrast.compute_prototypes([(features[:10], labels[:10]), (features[10:], labels[10:])], 3, limit=5)
    assert int(contrast.prototypes.counts.sum()) == 10
    contrast.compute_prototypes([(features, labels)], 3)
    x, x_aug = torch.randn(4, 6), torch.randn(4, 6)
    cosine = torch.stack([torch.nn.functional.cosine_similarity(x, m.expand_as(x), dim=1) for m in means], dim=1)
    views = torch.stack([means[cosine.argmax(1)], x, x_aug], dim=1)
    z = torch.nn.functional.normalize(contrast.projector(views), dim=-1)
    torch.testing.assert_close(contrast(x, x_aug), multi_view_contrastive_loss(z, 0.2))


def test_santa_loss_anchors_the_predictions_to_the_source_model(source, monkeypatch):
    """With ``lambda_cont: 0`` the loss is ``mean 1/2 CE(q(x), p(x)) + 1/2 CE(q(x), p(aug x))``,
    written out with the source model as the anchor (before and after adaptation moved the model);
    the prediction is ``p(x)`` before the step."""
    s = _make("santa", source, lambda_cont=0.0, lr=1e-2, **DIGITS)
    losses = []
    step = s.adaptation.step
    monkeypatch.setattr(s.adaptation, "step", lambda loss: (losses.append(loss.detach()), step(loss)))
    anchor = copy.deepcopy(classifier(s.backbone, s.head))
    for i, x in enumerate(_batches(source, 2)):
        net = copy.deepcopy(classifier(s.backbone, s.head))
        with torch.no_grad():
            p, q = net(x).double(), anchor(x).double()
            torch.manual_seed(i)
            p_aug = net(s.augment(x)).double()
        torch.manual_seed(i)
        out = _adapt(s, x)
        torch.testing.assert_close(out.double(), p, rtol=1e-5, atol=1e-6)
        expected = -(0.5 * (p.softmax(1) * q.log_softmax(1)).sum(1) + 0.5 * (p_aug.softmax(1) * q.log_softmax(1)).sum(1)).mean()
        torch.testing.assert_close(losses[-1].double(), expected, rtol=1e-5, atol=1e-6)
    assert not all(torch.equal(a, b) for a, b in zip(anchor.parameters(), classifier(s.backbone, s.head).parameters()))


def test_santa_needs_source_data_only_for_the_contrast(source):
    """A stream without source training data (a loaded source model): refused in one line naming
    ``lambda_cont``, and with ``lambda_cont: 0`` adaptation runs."""
    lone = Experience(1, None, source["tta_exp"].test, [], list(range(10)))
    lone.past = ()
    with pytest.raises(UserError, match="lambda_cont: 0"):
        _make("santa", source, start=False, **DIGITS).before_experience(lone)
    s = _make("santa", source, start=False, lambda_cont=0.0, **DIGITS)
    s.before_experience(lone)
    assert _adapt(s, _batches(source, 1)[0]).shape == (64, 10)


# ------------------------------------------------------------------ adacontrast


def test_contrastive_memory_queue_mask_and_refinement_written_out():
    """The queue is a ring of unit keys with labels; the class-aware instance loss is the
    cross-entropy with the positive over the entries of other labels, written out; the first
    1,024 samples keep their argmax, then the label is the argmax of the mean probability of the
    ``k`` nearest bank features (cosine), the bank a ring of the last ``K`` entries."""
    torch.manual_seed(0)
    memory = ContrastiveMemory(4, queue_size=6, num_neighbors=3)
    memory.start(3)
    assert torch.allclose(memory.keys.norm(dim=0), torch.ones(6)) and memory.key_labels.max() < 3
    keys = torch.nn.functional.normalize(torch.randn(4, 4), dim=1)
    memory.enqueue(keys, torch.tensor([0, 1, 2, 0]))
    memory.enqueue(keys[:3], torch.tensor([2, 2, 1]))
    assert int(memory.key_position) == 1 and torch.equal(memory.key_labels[[0, 4, 5]], torch.tensor([1, 2, 2]))
    torch.testing.assert_close(memory.keys[:, 0], keys[2])
    q, k = torch.nn.functional.normalize(torch.randn(2, 4), dim=1), torch.nn.functional.normalize(torch.randn(2, 4), dim=1)
    labels = torch.tensor([2, 0])
    logits = memory.instance_logits(q, k, 0.5)
    expected = []
    for i in range(2):
        negatives = (q[i] @ memory.keys)[memory.key_labels != labels[i]] / 0.5
        positive = (q[i] @ k[i]) / 0.5
        expected.append(-positive + torch.logsumexp(torch.cat([positive.view(1), negatives]), 0))
    torch.testing.assert_close(memory.instance_loss(logits, labels), torch.stack(expected).mean())
    features, probs = torch.randn(1000, 4), torch.randn(1000, 3).softmax(1)
    assert torch.equal(memory.pseudo_labels(features, probs), probs.argmax(1))  # 1,000 labelled
    memory.update_bank(features[:8], probs[:8].log())
    assert torch.equal(memory.pseudo_labels(features[8:40], probs[8:40]), probs[8:40].argmax(1))  # 1,032 now
    query = features[40:42]
    similarity = torch.nn.functional.normalize(query, dim=1) @ torch.nn.functional.normalize(features[:8], dim=1).T
    nearest = similarity.topk(3, dim=1).indices
    assert torch.equal(memory.pseudo_labels(query, probs[40:42]), probs[:8][nearest].mean(1).argmax(1))
    memory.queue_size = 8
    memory.update_bank(features[100:103], probs[100:103].log())  # full: overwrites entries 0 .. 2
    torch.testing.assert_close(memory.bank["features"][:3], features[100:103])
    assert memory.bank["position"] == 3


def test_adacontrast_predicts_after_the_step_with_running_statistics(source):
    """The returned prediction is the adapted model's in evaluation mode (BatchNorm on running
    statistics, which the training-mode passes moved); every weight and bias adapted; the
    momentum model moved towards the model by ``1 - m``."""
    s = _make("adacontrast", source, queue_size=256, lr=0.01)
    x = _batches(source, 1)[0]
    running = s.backbone.stem[1].running_mean.clone()
    teacher_before = {n: p.clone() for n, p in s.teacher.model.named_parameters()}
    before = _params(s)
    torch.manual_seed(0)
    out = _adapt(s, x)
    net = classifier(s.backbone, s.head)
    assert not s.backbone.stem[1].training and not torch.equal(running, s.backbone.stem[1].running_mean)
    with torch.no_grad():
        torch.testing.assert_close(out, net(x))
    after = _params(s)
    assert all(not torch.equal(after[n], before[n]) for n in before)
    for n, p in s.teacher.model.named_parameters():  # the EMA step saw the weights before the step
        torch.testing.assert_close(p, 0.999 * teacher_before[n] + 0.001 * before[n], rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------ state


@pytest.mark.parametrize("name", METHODS)
def test_state_dict_round_trip_continues_identically(source, name):
    """Saved after two batches and loaded into a fresh strategy: the third and fourth batches
    give the same predictions and states (moving priors and optimizer state included)."""
    s = _make(name, source, **OPTIONS[name])
    batches = _batches(source, 4)
    for x in batches[:2]:
        _adapt(s, x)
    restored = _make(name, source, start=False, **OPTIONS[name])
    restored.load_state_dict(copy.deepcopy(s.state_dict()))
    restored.before_experience(source["tta_exp"])
    for i, x in enumerate(batches[2:]):
        torch.manual_seed(i)
        a = _adapt(s, x)
        torch.manual_seed(i)
        assert torch.equal(a, _adapt(restored, x))
    assert s.state_dict().keys() == restored.state_dict().keys()
    for (n, p), (_, q) in zip(s.state_dict().items(), restored.state_dict().items()):
        if isinstance(p, torch.Tensor):
            assert torch.equal(p, q), n


@pytest.mark.parametrize("name", METHODS)
def test_loading_the_source_state_restarts_from_the_source(source, name):
    """What ``reset_each_domain`` does between domains: the source state loaded gives a fresh
    start (moving priors cleared), identical to a new strategy's."""
    s = _make(name, source, start=False, **OPTIONS[name])
    source_state = copy.deepcopy(s.state_dict())
    s.before_experience(source["tta_exp"])
    batches = _batches(source, 3)
    for x in batches[:2]:
        _adapt(s, x)
    s.load_state_dict(source_state)
    torch.manual_seed(7)  # SANTA's prototype pass is shuffled
    s.before_experience(source["tta_exp"])
    fresh = _make(name, source, start=False, **OPTIONS[name])
    torch.manual_seed(7)
    fresh.before_experience(source["tta_exp"])
    for i, x in enumerate(batches[1:]):
        torch.manual_seed(i)
        a = _adapt(s, x)
        torch.manual_seed(i)
        assert torch.equal(a, _adapt(fresh, x))


# ------------------------------------------------------------------ streams


STREAMS = {
    "continual": {"corruptions": ["gaussian_noise", "brightness"]},
    "gradual": {"corruptions": ["gaussian_noise"], "mode": "gradual", "test_per_class": 5},
    "mixed": {"corruptions": ["gaussian_noise", "brightness"], "mode": "mixed", "chunk_size": 50},
    "dirichlet": {
        "corruptions": ["gaussian_noise", "brightness"],
        "label_shift": "dirichlet",
        "dirichlet_concentration": 1.0,
        "test_per_class": 20,
    },
}


@pytest.mark.parametrize("stream", STREAMS)
@pytest.mark.parametrize("name", METHODS)
def test_runs_every_test_time_stream(name, stream, tmp_path):
    """Through the engine on a tiny CNN: the stream's domains are all scored, errors are finite
    and below chance, and the method adapted (its parameters left the source model's)."""
    cfg = {
        "seed": 0,
        "scenario": {
            "name": "test_time_adaptation",
            "dataset": "sklearn_digits",
            "root": str(tmp_path / "data"),
            "severity": 3,
            "train_per_class": 24,
            "test_per_class": 10,
            **STREAMS[stream],
        },
        "backbone": {"name": "cnn", "widths": [8, 16]},
        "strategy": {"name": name, **OPTIONS[name]},
        "train": {"epochs": 5, "batch_size": 16, "lr": 0.01, "optimizer": "adam"},
        "eval": {"batch_size": 128, "baseline": False},
        "logging": {"tensorboard": False, "progress": "never"},
    }
    engine = clpeft.engine.Engine(clpeft.config.resolve(cfg), tmp_path / "run", device="cpu")
    built = engine.build()
    snapshot = {}
    hook = built.strategy.before_experience

    def spied(exp):
        hook(exp)
        if exp.train is None and not snapshot:
            snapshot.update(_params(built.strategy))

    built.strategy.before_experience = spied
    result = engine.run(built)
    errors = result["metrics"]["error_per_domain"]
    domains = {"continual": 2, "gradual": 9, "mixed": 4, "dirichlet": 2}[stream]
    assert len(errors) == domains and np.all(np.isfinite(errors)) and np.mean(errors) < 0.8, errors
    after = _params(built.strategy)
    assert any(not torch.equal(after[n], snapshot[n]) for n in snapshot)
