"""FeCAM, EASE and CoFiMA against LAMDA-PILOT's official code (``shared/refs/pilot``).

The conventions and the shared pieces are ``test_pilot.py``'s: the same tiny random ViT (timm's
``test_vit``) on both sides, the same seeded images preprocessed once by clpeft's backbone,
PILOT's learners assembled without their ``__init__`` (which downloads ViT-B/16), PILOT's
adapter ViT given clpeft's weights key by key. Compared over two tasks:

* FeCAM (``models/fecam.py``): the first session's adapter and cosine-head SGD steps, the class
  means, the shrunk and normalised covariances (through their pseudo-inverses) and the
  Mahalanobis distances;
* the published configs against ``exps/*.json``.
"""

from __future__ import annotations

import importlib
import inspect
import json
import types
import warnings
from pathlib import Path

import pytest
import timm
import torch

import clpeft.config
from clpeft.strategies.fecam import FeCAM

from .test_pilot import (
    BOTTLENECK,
    CONFIGS,
    TASKS,
    _attached,
    _backbone,
    _close,
    _experience,
    _learner,
    _loader,
    _pilot_adapter_vit,
    _pilot_keys,
    _pilot_vit_net,
    _predict,
    _set_task,
    _task_data,
    _test_inputs,
    _train_steps,
)


@pytest.fixture
def pilot(load_reference):
    """PILOT's ``models.{fecam,ease,cofima}``, ``utils.inc_net``, ``backbone.{vit_adapter,vit_ease}``."""
    weight_init = types.ModuleType("timm.models.layers.weight_init")
    weight_init.trunc_normal_ = timm.layers.trunc_normal_
    with warnings.catch_warnings():  # its timm.models.layers / registry imports are deprecated
        warnings.simplefilter("ignore", FutureWarning)
        with load_reference("pilot", "models.fecam", stubs={"timm.models.layers.weight_init": weight_init}) as fecam:
            yield types.SimpleNamespace(
                fecam=fecam, **{name.rpartition(".")[2]: importlib.import_module(name) for name in (
                    "utils.inc_net", "backbone.vit_adapter")},
                root=Path(fecam.__file__).parents[1])


# ---------------------------------------------------------------------------------- FeCAM

PILOT_FECAM = {"shrinkage_diagonal": 0.0, "shrinkage_off_diagonal": 0.0, "ridge": 100.0, "normalisation": "corrcoef"}


def test_fecam_adapter_session_statistics_and_distances_equal_pilots(pilot):
    """FeCAM (adapter): PILOT's first session, class means, covariances and Mahalanobis distances.

    Task 0 trains the adapters (bottleneck 8) and the cosine head for one epoch as in
    ``test_pilot.py``'s RanPAC test; both sides then fit every class of both tasks. PILOT keeps
    ``corrcoef(cov + 100 I)`` per class and takes its float32 ``pinv`` at every distance; clpeft keeps
    the float64 pseudo-inverse. The matrix is singular (``torch.corrcoef`` centres its rows, so they
    span D - 1 dimensions): both pseudo-inverses drop that direction (its eigenvalue is rounding
    noise, below their cut-offs), so they are compared as computed; a float64 ``pinv`` of PILOT's
    float32 matrix would keep the noise (entries ~1e6). Tolerances: 1e-4 relative on the adapters, means and precisions (float32
    covariances on PILOT's side), 1e-4 absolute on the distances. Mutations checked: the paper's
    ``normalisation: correlation`` instead of PILOT's ``corrcoef``, ``ridge`` 100 -> 10, and
    biased (``ddof=0``) covariances each fail it.
    """
    backbone = _backbone()
    strategy = _attached(FeCAM(backbone, adapt="adapter", adapter_bottleneck=BOTTLENECK, **PILOT_FECAM))
    exp0 = _experience(0)
    strategy.before_experience(exp0)
    adapted = _pilot_adapter_vit(pilot, strategy.backbone)
    network = _pilot_vit_net(pilot, adapted)
    network.update_fc(len(TASKS[0]))
    with torch.no_grad():
        network.fc.weight.copy_(strategy.adapt_head.weight)
    learner = _learner(pilot.fecam, network, resume=False, dataset="toy", model_name="fecam", init_cls=2, increment=2)
    learner.cov_mats, learner.alpha = [], 100  # its __init__'s
    learner.save_checkpoint = lambda *a: None  # would write the adapted model to disk

    _train_steps(strategy, exp0)
    trained = _pilot_keys(strategy.backbone.net.state_dict())
    strategy.after_experience(exp0)
    torch.manual_seed(5)
    _set_task(learner, 0)
    x0, y0 = _task_data(0)
    learner._train(_loader(backbone, x0, y0), [], _loader(backbone, x0, y0))
    for key, value in adapted.state_dict().items():
        _close(trained[key], value)
    exp1 = _experience(1)
    strategy.before_experience(exp1)
    strategy.after_experience(exp1)
    network.update_fc(4)
    _set_task(learner, 1)
    learner._train([], [], _loader(backbone, *_task_data(1)))
    learner._total_classes = 4

    _close(strategy.head.means, network.fc.weight)
    for c, cov in enumerate(learner.cov_mats):
        _close(strategy.head.precision[c], torch.linalg.pinv(cov), rtol=1e-4, atol=1e-5)
    x = _test_inputs()
    with torch.no_grad():
        vectors = network.eval().backbone(backbone.preprocess(x)).numpy()
        distances = torch.from_numpy(learner._maha_dist(vectors, network.fc.weight.data, learner.cov_mats)).T
    _close(_predict(strategy, x), -distances, atol=1e-4)


@pytest.mark.parametrize("dataset, exps", [("cifar100", "fecam.json"), ("imagenet_r", "fecam_inr.json")])
def test_fecam_published_configs_are_pilots_setup(pilot, dataset, exps):
    """``configs/fecam/{cifar100,imagenet_r}_10t.yaml`` hold what ``python main.py --config ./exps/<json>`` runs.

    From the JSON: tasks (``init_cls`` = ``increment``), ``tuned_epoch``, SGD lr, batch size, weight
    decay, the cosine schedule to ``min_lr`` 0 and ``ffn_num``; from ``models/fecam.py``: the
    adapter backbone, the shrinkage ``cov + alpha I`` with ``alpha = 100`` and ``torch.corrcoef``;
    the backbone, images and class order as ``test_pilot.py``'s published-config test states for
    the adapter methods. Mutation checked: ``ridge: 10`` in either config fails it.
    """
    official = json.loads((pilot.root / "exps" / exps).read_text())
    source = inspect.getsource(pilot.fecam.Learner)
    assert "self.alpha = 100" in source and "torch.corrcoef(self.shrink_cov(cov,self.alpha))" in source
    cfg = clpeft.config.load(CONFIGS / "fecam" / f"{dataset}_10t.yaml")
    train, strategy, scenario, backbone = cfg.train, cfg.strategy.params, cfg.scenario.params, cfg.backbone.params
    assert official["init_cls"] == official["increment"] == {"cifar100": 100, "imagenet_r": 200}[dataset] // scenario["n_experiences"]
    assert scenario["class_order"] == official["seed"][0] == 1993
    assert official["backbone_type"] == "pretrained_vit_b16_224_adapter"
    assert backbone["model"] == "vit_base_patch16_224.augreg_in21k_ft_in1k" and backbone["pretrained"]
    assert (backbone["mean"], backbone["std"], backbone["crop_pct"]) == ([0, 0, 0], [1, 1, 1], 0.875)
    assert train.amp == "off" and train.augment == "crop_flip"
    assert train.epochs == official["tuned_epoch"]
    assert (train.optimizer, train.momentum, official["optimizer"]) == ("sgd", 0.9, "sgd")
    assert (train.lr, train.batch_size, train.weight_decay) == (official["init_lr"], official["batch_size"], official["weight_decay"])
    assert (train.schedule, train.min_lr) == ("cosine_epoch", official["min_lr"]) == ("cosine_epoch", 0)
    assert {k: strategy[k] for k in PILOT_FECAM} == PILOT_FECAM
    assert strategy["adapt"] == "adapter" and strategy["adapter_bottleneck"] == official["ffn_num"]
