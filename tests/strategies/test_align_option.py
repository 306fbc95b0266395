"""The ``align`` option of the prompt and LoRA strategies (SLCA's classifier alignment added on top).

Each strategy runs the sklearn-digits stream twice, with and without ``align``: the trained
head and everything else trained must come out bitwise equal (alignment only builds the copy
that predicts), the copy must cover every class and be what ``predict`` reads, and on the MLP
streams (where heads trained on two classes at a time are not calibrated against each other) it
must raise the accuracy over all classes seen. With ``drift_compensation`` (SDC) training is
again untouched and only the stored means of earlier experiences' classes move.
"""

from __future__ import annotations

import pytest
import torch

import clpeft.config
from clpeft.errors import UserError

VIT = {"name": "timm", "model": "test_vit", "img_size": 32, "freeze": True}
MLP = {"name": "mlp", "hidden": [64]}
MLP_TARGETS = ["net.0"]
METHODS = {
    "l2p": ({"pool_size": 6, "prompt_length": 2, "top_k": 3}, VIT),
    "dualprompt": ({"pool_size": 5, "g_length": 2, "e_length": 3, "g_layers": [0], "e_layers": [1, 2]}, VIT),
    "coda_prompt": ({"components_per_task": 3, "prompt_length": 4, "layers": [0, 1, 2]}, VIT),
    "lora_cl": ({"targets": MLP_TARGETS, "rank": 3}, MLP),
    "merge_cl": ({"mode": "lora", "targets": MLP_TARGETS, "rank": 3}, MLP),
}
LAE = ({"targets": MLP_TARGETS, "ema_momentum": 0.8, "freeze_epochs": 1}, MLP)


def _run(tmp_path, run_keeping, name: str, align: bool, per_class: int = 8, epochs: int = 2, **extra):
    params, backbone = LAE if name == "lae" else METHODS[name]
    return run_keeping(
        {
            "seed": 0,
            "scenario": {
                "name": "class_incremental",
                "dataset": "sklearn_digits",
                "n_experiences": 5,
                "train_per_class": per_class,
                "test_per_class": 10,
                "root": str(tmp_path / "data"),
            },
            "backbone": backbone,
            "strategy": {"name": name, **params, "align": align, **extra},
            "train": {"epochs": epochs, "batch_size": 16, "lr": 0.01, "optimizer": "adam", "feature_cache": "memory"},
            "eval": {"batch_size": 64, "baseline": False},
            "logging": {"tensorboard": False, "progress": "never"},
        },
        tmp_path / f"{name}-{align}-{len(extra)}",
    )


@pytest.mark.parametrize("name", list(METHODS))
def test_alignment_changes_only_the_predicting_copy(tmp_path, run_keeping, name):
    _, plain, stream = _run(tmp_path, run_keeping, name, align=False)
    _, aligned, _ = _run(tmp_path, run_keeping, name, align=True)
    trained = {k: v for k, v in aligned.state_dict().items() if not k.startswith("aligned.") and isinstance(v, torch.Tensor)}
    reference = {k: v for k, v in plain.state_dict().items() if not k.startswith("aligned.") and isinstance(v, torch.Tensor)}
    assert trained.keys() == reference.keys()
    assert [k for k in trained if not torch.equal(trained[k], reference[k])] == []
    assert plain.aligned.head.n_classes == 0  # nothing is aligned (or stored) without the option
    assert aligned.aligned.head.n_classes == aligned.head.n_classes == 10
    assert not torch.equal(aligned.aligned.head.weight, aligned.head.weight)
    x = torch.cat([exp.test.load()[0] for exp in stream])
    queries = {"query": aligned.backbone(x)} if aligned.needs_query else {}
    with torch.no_grad():
        aligned.eval(), plain.eval()
        rows = aligned.head.weight.clone(), aligned.head.bias.clone()
        aligned.head.weight.copy_(aligned.aligned.head.weight)  # the trained head with the aligned rows...
        aligned.head.bias.copy_(aligned.aligned.head.bias)
        aligned.aligned.enabled = False  # ... and no alignment gives the aligned predictions
        expected = aligned.predict(x, **queries)
        aligned.aligned.enabled = True
        aligned.head.weight.copy_(rows[0]), aligned.head.bias.copy_(rows[1])
        assert torch.equal(aligned.predict(x, **queries), expected)
        assert not torch.equal(expected, plain.predict(x, **queries))


@pytest.mark.parametrize("name", ["lora_cl", "merge_cl"])
def test_alignment_raises_the_accuracy_over_all_classes(tmp_path, run_keeping, name):
    plain, _, _ = _run(tmp_path, run_keeping, name, align=False, per_class=40, epochs=3)
    aligned, _, _ = _run(tmp_path, run_keeping, name, align=True, per_class=40, epochs=3)
    assert aligned["acc_matrix"][0] == plain["acc_matrix"][0]  # nothing to align after the first task
    assert aligned["metrics"]["acc_last"] > plain["metrics"]["acc_last"] + 0.1


@pytest.mark.parametrize("name", ["l2p", "lora_cl", "merge_cl"])
def test_drift_compensation_moves_only_the_old_classes_stored_means(tmp_path, run_keeping, name):
    _, aligned, _ = _run(tmp_path, run_keeping, name, align=True)
    _, compensated, _ = _run(tmp_path, run_keeping, name, align=True, drift_compensation=True)
    trained = {k: v for k, v in compensated.state_dict().items() if not k.startswith("aligned.") and isinstance(v, torch.Tensor)}
    reference = {k: v for k, v in aligned.state_dict().items() if not k.startswith("aligned.") and isinstance(v, torch.Tensor)}
    assert [k for k in trained if not torch.equal(trained[k], reference[k])] == []  # training is untouched
    moved, plain = compensated.aligned.alignment.stats, aligned.aligned.alignment.stats
    assert torch.equal(moved.counts, plain.counts) and torch.equal(moved.scatter, plain.scatter)
    assert torch.equal(moved.mean[8:], plain.mean[8:])  # the last experience's classes: their own features
    shift = (moved.mean[:8] - plain.mean[:8]).norm(dim=1)
    assert bool((shift > 1e-6).all()), shift  # every older class moved with the features


def test_lae_aligns_one_head_copy_per_expert_and_ensembles_them(tmp_path, run_keeping):
    _, plain, stream = _run(tmp_path, run_keeping, "lae", align=False)
    _, aligned, _ = _run(tmp_path, run_keeping, "lae", align=True, drift_compensation=True)
    trained = {k: v for k, v in aligned.state_dict().items() if not k.startswith("aligned_") and isinstance(v, torch.Tensor)}
    reference = {k: v for k, v in plain.state_dict().items() if not k.startswith("aligned_") and isinstance(v, torch.Tensor)}
    assert [k for k in trained if not torch.equal(trained[k], reference[k])] == []
    online, offline = aligned.aligned_online.head, aligned.aligned_offline.head
    assert online.n_classes == offline.n_classes == 10 and not torch.equal(online.weight, offline.weight)
    x = torch.cat([exp.test.load()[0] for exp in stream])
    with torch.no_grad():
        aligned.eval()
        p_online = torch.softmax(online(aligned.backbone(x)), dim=1)
        p_offline = torch.softmax(offline(aligned._offline_features(x)), dim=1)
        assert torch.equal(aligned.predict(x), torch.maximum(p_online, p_offline).log())


@pytest.mark.parametrize("name", [*METHODS, "lae", "slca"])
def test_drift_compensation_without_align_is_refused_naming_the_key(tmp_path, name):
    params, backbone = LAE if name == "lae" else METHODS.get(name, ({}, MLP))
    with pytest.raises(UserError, match=r"^strategy\.drift_compensation: needs align: true"):
        clpeft.config.resolve(
            {
                "scenario": {"name": "class_incremental", "dataset": "sklearn_digits", "n_experiences": 5},
                "backbone": backbone,
                "strategy": {"name": name, **params, "align": False, "drift_compensation": True},
            }
        )
