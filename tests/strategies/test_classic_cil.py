"""The classic class-incremental methods (iCaRL, SI, MAS, WA, BiC) through the engine, on a trainable and a frozen MLP.

Tiny offline streams of scikit-learn digits. What each test shows could fail:

* **Orderings** against fine-tuning on the same stream and seed: iCaRL forgets less on a
  class-incremental stream (5 experiences x 2 classes); SI and MAS, which only regularise the
  weights, forget less on a domain-incremental one (digits rotated by 0, 60 and 120 degrees; on a
  class-incremental stream they stay near fine-tuning, as in every class-IL table since
  van de Ven & Tolias 2019). Both with the backbone trained and frozen (cached features, only
  the head learns).
* **WA's defining property**: after each experience the new classes' weight vectors are rescaled
  by one factor to the old ones' mean norm, the rest untouched; the head stays non-negative; its
  loss equals a numpy computation of eq. 3. WA forgets less than fine-tuning on a trainable MLP.
* **BiC's defining property**: the validation set is held out of training and balanced over the
  classes seen; the fitted correction changes only the latest classes' logits, by ``alpha o + beta``.
  BiC forgets less than fine-tuning on a trainable MLP.
* **iCaRL's defining property**: its predictions are the nearest mean of exemplars, recomputed
  here in numpy from the memory's samples and the final backbone, and so are the accuracies the
  engine recorded.
* **Resume**: a run stopped before its third experience and resumed from its checkpoints gives
  the accuracy matrix of an uninterrupted run, bitwise.

Equality with the official code is in ``tests/reference/test_classic_cil.py``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

CLASS_INCREMENTAL = {
    "name": "class_incremental",
    "dataset": "sklearn_digits",
    "n_experiences": 5,
    "train_per_class": 30,
    "test_per_class": 10,
}
DOMAIN_INCREMENTAL = {
    "name": "domain_incremental",
    "dataset": "sklearn_digits",
    "train_per_class": 30,
    "test_per_class": 10,
    "domains": [{"rotation": 0}, {"rotation": 60}, {"rotation": 120}],
}
METHODS = {  # name -> (strategy section, stream it is compared on)
    "icarl_bce": ({"name": "icarl", "mem_size": 100}, CLASS_INCREMENTAL),
    "icarl_ce": ({"name": "icarl", "mem_size": 100, "loss": "ce"}, CLASS_INCREMENTAL),
    "si": ({"name": "si", "c": 10.0}, DOMAIN_INCREMENTAL),
    "mas": ({"name": "mas", "lambda_reg": 1.0}, DOMAIN_INCREMENTAL),
}
RESUMED = {
    **METHODS,
    "wa": ({"name": "wa", "mem_size": 40}, CLASS_INCREMENTAL),
    "bic": ({"name": "bic", "mem_size": 40, "bias_epochs": 5}, CLASS_INCREMENTAL),
}
BACKBONES = {"trainable": False, "frozen": True}


@pytest.fixture(autouse=True)
def _cache_env(tmp_path, monkeypatch):
    monkeypatch.setenv("CLPEFT_CACHE", str(tmp_path / "cache"))


def _config(strategy: dict, scenario: dict, frozen: bool, root) -> dict:
    return {
        "seed": 0,
        "scenario": {**scenario, "root": str(root)},
        "backbone": {"name": "mlp", "hidden": [32], "freeze": frozen},
        "strategy": strategy,
        "train": {"epochs": 5, "batch_size": 16, "lr": 0.05, "optimizer": "sgd"},
        "eval": {"batch_size": 128, "baseline": False},
        "logging": {"tensorboard": False, "progress": "never"},
    }


@pytest.mark.parametrize("backbone", BACKBONES)
@pytest.mark.parametrize("method", METHODS)
def test_forgets_less_than_finetune(method, backbone, tmp_path, run_keeping):
    strategy, scenario = METHODS[method]
    frozen = BACKBONES[backbone]
    mine, trained, _ = run_keeping(_config(strategy, scenario, frozen, tmp_path / "data"), tmp_path / "method")
    finetune, _, _ = run_keeping(_config({"name": "finetune"}, scenario, frozen, tmp_path / "data"), tmp_path / "finetune")
    assert trained.uses_features == frozen
    assert mine["metrics"]["forgetting"] < finetune["metrics"]["forgetting"] - 0.15, (mine["metrics"], finetune["metrics"])


def _nme_predictions(features: np.ndarray, exemplar_features: np.ndarray, exemplar_labels: np.ndarray, n_classes: int):
    """iCaRL's Alg. 1 in numpy: the nearest unit-length mean of the normalised exemplar features."""

    def unit(x):
        return x / (np.linalg.norm(x, axis=1, keepdims=True) + 1e-8)

    means = np.stack([unit(exemplar_features[exemplar_labels == c]).mean(0) for c in range(n_classes)])
    means /= np.linalg.norm(means, axis=1, keepdims=True)
    return np.linalg.norm(unit(features)[:, None, :] - means[None], axis=2).argmin(1)


@pytest.mark.parametrize("backbone", BACKBONES)
def test_icarl_predicts_the_nearest_mean_of_exemplars(backbone, tmp_path, run_keeping):
    config = _config({"name": "icarl", "mem_size": 60}, CLASS_INCREMENTAL, BACKBONES[backbone], tmp_path / "data")
    result, strategy, stream = run_keeping(config, tmp_path / "run")
    assert len(strategy.rehearsal.memory) == 60 and torch.bincount(strategy.rehearsal.memory.labels).tolist() == [6] * 10
    x_memory, y_memory = strategy.rehearsal.memory.view(stream).load()
    with torch.no_grad():
        exemplars = strategy.backbone(x_memory).double().numpy()
        accuracies = []
        for exp in stream:
            x, y = exp.test.load()
            features = strategy.backbone(x)
            expected = _nme_predictions(features.double().numpy(), exemplars, y_memory.numpy(), 10)
            assert np.array_equal(strategy.means(features).argmax(1).numpy(), expected)
            accuracies.append(float((expected == y.numpy()).mean()))
    np.testing.assert_allclose(result["acc_matrix"][-1], accuracies, atol=1e-9)


@pytest.mark.parametrize("method", RESUMED)
def test_resume_gives_the_same_matrix(method, tmp_path, interrupted_then_resumed):
    strategy, scenario = RESUMED[method]
    config = _config(strategy, {**scenario, "train_per_class": 12}, False, tmp_path / "data")
    config["train"]["epochs"] = 2
    full, resumed = interrupted_then_resumed(config, tmp_path, at=2)
    assert resumed == full


# --------------------------------------------------------------------------------------------
# WA
# --------------------------------------------------------------------------------------------


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


@pytest.mark.parametrize("backbone", BACKBONES)
def test_wa_aligns_new_norms_to_old_clips_and_weighs_its_loss(backbone, tmp_path, run_keeping, monkeypatch):
    """Through the engine: after each experience the new classes' weight rows are the trained rows
    times one ``gamma`` and have the old rows' mean norm (old rows and biases untouched); after every
    step every head weight is >= 0; the paper's loss is ``(1 - n/(n+m)) CE + n/(n+m) KL_T`` (numpy)."""
    from clpeft.strategies.wa import WA

    T = 2.0
    aligned, losses, clipped = [], [], []
    after, step, after_step = WA.after_experience, WA.training_step, WA.after_training_step

    def spy_after(self, exp):
        n_old = self.rehearsal.n_old
        before = (self.head.weight.detach().clone(), self.head.bias.detach().clone())
        after(self, exp)
        aligned.append((n_old, *before, self.head.weight.detach().clone(), self.head.bias.detach().clone()))

    def spy_step(self, batch):
        loss = step(self, batch)
        if self.rehearsal.teacher is not None:
            with torch.no_grad():
                features = self.embed(batch.x)
                logits = self.head(features).double().numpy()
                old = self.rehearsal.teacher(batch.x, features).double().numpy()
            y = batch.y.numpy()
            ce = -_log_softmax(logits)[np.arange(len(y)), y].mean()
            log_q, log_p = _log_softmax(old / T), _log_softmax(logits[:, : old.shape[1]] / T)
            kl = (np.exp(log_q) * (log_q - log_p)).sum(1).mean()
            share = old.shape[1] / logits.shape[1]
            losses.append((loss.item(), (1 - share) * ce + share * kl))
        return loss

    def spy_after_step(self):
        replaced = after_step(self)
        clipped.append(bool((self.head.weight >= 0).all()))
        return replaced

    monkeypatch.setattr(WA, "after_experience", spy_after)
    monkeypatch.setattr(WA, "training_step", spy_step)
    monkeypatch.setattr(WA, "after_training_step", spy_after_step)
    config = _config(
        {"name": "wa", "mem_size": 40, "temperature": T, "kd_weight": None}, CLASS_INCREMENTAL, BACKBONES[backbone], tmp_path / "data"
    )
    run_keeping(config, tmp_path / "run")
    assert len(aligned) == 5 and losses and clipped and all(clipped)
    np.testing.assert_allclose(*zip(*losses), rtol=1e-5)
    for n_old, w_before, b_before, w_after, b_after in aligned:
        assert torch.equal(w_after[:n_old], w_before[:n_old]) and torch.equal(b_after, b_before)
        if n_old == 0:
            assert torch.equal(w_after, w_before)
            continue
        gamma = w_after[n_old:].norm() / w_before[n_old:].norm()
        torch.testing.assert_close(w_after[n_old:], gamma * w_before[n_old:])
        torch.testing.assert_close(w_after[n_old:].norm(dim=1).mean(), w_after[:n_old].norm(dim=1).mean())


def test_wa_pycil_loss_is_ce_plus_weighted_distillation():
    from clpeft.backbones.mlp import MLPBackbone
    from clpeft.components.regularization.previous_model import PreviousModel
    from clpeft.data import Batch
    from clpeft.strategies.wa import WA

    torch.manual_seed(0)
    strategy = WA(MLPBackbone(input_shape=(6,), hidden=[8], scale=1.0), kd_weight=3.0, temperature=1.5)
    strategy.head.grow_to(3)
    strategy.rehearsal.teacher = PreviousModel(strategy.head)
    strategy.rehearsal.teacher.head.bias.data += torch.tensor([0.5, -1.0, 0.2])  # a teacher that differs
    strategy.head.grow_to(5)
    x, y = torch.randn(7, 6), torch.tensor([0, 1, 2, 3, 4, 3, 4])
    with torch.no_grad():
        logits = strategy.head(strategy.backbone(x)).double().numpy()
        old = strategy.rehearsal.teacher.head(strategy.backbone(x)).double().numpy()
    ce = -_log_softmax(logits)[np.arange(7), y.numpy()].mean()
    log_q, log_p = _log_softmax(old / 1.5), _log_softmax(logits[:, :3] / 1.5)
    expected = ce + 3.0 * (np.exp(log_q) * (log_q - log_p)).sum(1).mean()
    assert strategy.training_step(Batch(x, y)).item() == pytest.approx(expected, rel=1e-5)


def test_wa_forgets_less_than_finetune(tmp_path, run_keeping):
    """Trainable MLP, new classes outnumbering their exemplars 15 to 1, 15 epochs (the imbalance WA
    corrects). On frozen random features a linear head clipped to non-negative weights cannot keep
    the old classes apart: WA stays near fine-tuning there (the alignment test above covers it)."""
    scenario = {**CLASS_INCREMENTAL, "train_per_class": 60}
    configs = {
        name: _config(strategy, scenario, False, tmp_path / "data")
        for name, strategy in {"wa": {"name": "wa", "mem_size": 40}, "finetune": {"name": "finetune"}}.items()
    }
    for config in configs.values():
        config["train"]["epochs"] = 15
    wa, _, _ = run_keeping(configs["wa"], tmp_path / "wa")
    finetune, _, _ = run_keeping(configs["finetune"], tmp_path / "finetune")
    assert wa["metrics"]["forgetting"] < finetune["metrics"]["forgetting"] - 0.3, (wa["metrics"], finetune["metrics"])


# --------------------------------------------------------------------------------------------
# BiC
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backbone", BACKBONES)
def test_bic_corrects_only_the_new_classes_from_a_held_out_balanced_set(backbone, tmp_path, run_keeping, monkeypatch):
    """From the second experience on: the validation set is held out of training and has the same
    number of samples of every class seen; after training, the predictions are the head's logits with
    only the latest classes' columns mapped to ``alpha o + beta`` (fitted: not the identity)."""
    from clpeft.strategies.bic import BiC

    seen, train_data, after = [], BiC.train_data, BiC.after_experience

    def spy_train_data(self, exp):
        data = train_data(self, exp)
        if self.validation is not None:
            held, trained = self.validation.load()[0].flatten(1), data.load()[0].flatten(1)
            assert not (held[:, None] == trained[None]).all(-1).any(), "a validation sample is trained on"
            counts = torch.bincount(self.validation.targets)
            assert len(counts) == exp.n_classes_seen and len(set(counts.tolist())) == 1, counts
        return data

    def spy_after(self, exp):
        n_old = self.rehearsal.n_old
        after(self, exp)
        x = exp.train.load()[0][:16]
        with torch.no_grad():
            raw, predicted = self.head(self.backbone(x)), self.correction(self.head(self.backbone(x)))
        seen.append((n_old, self.head.n_classes, float(self.correction.alpha), float(self.correction.beta), raw, predicted))

    monkeypatch.setattr(BiC, "train_data", spy_train_data)
    monkeypatch.setattr(BiC, "after_experience", spy_after)
    config = _config({"name": "bic", "mem_size": 60, "bias_epochs": 20}, CLASS_INCREMENTAL, BACKBONES[backbone], tmp_path / "data")
    run_keeping(config, tmp_path / "run")
    assert len(seen) == 5
    for n_old, n_seen, alpha, beta, raw, predicted in seen:
        if n_old == 0:
            assert torch.equal(predicted, raw)
            continue
        assert (alpha, beta) != (1.0, 0.0)
        assert torch.equal(predicted[:, :n_old], raw[:, :n_old])
        torch.testing.assert_close(predicted[:, n_old:n_seen], alpha * raw[:, n_old:n_seen] + beta)


def test_bic_forgets_less_than_finetune(tmp_path, run_keeping):
    """Trainable MLP. On frozen random features BiC's linear head, whose cross-entropy weighs 1 - n/(n+m),
    keeps little of the old classes (the correction test above runs it there)."""
    scenario = CLASS_INCREMENTAL
    bic, _, _ = run_keeping(
        _config({"name": "bic", "mem_size": 100, "bias_epochs": 50}, scenario, False, tmp_path / "data"), tmp_path / "bic"
    )
    finetune, _, _ = run_keeping(_config({"name": "finetune"}, scenario, False, tmp_path / "data"), tmp_path / "finetune")
    assert bic["metrics"]["forgetting"] < finetune["metrics"]["forgetting"] - 0.3, (bic["metrics"], finetune["metrics"])
