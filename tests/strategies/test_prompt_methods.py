"""L2P, DualPrompt and CODA-Prompt through the engine, on a tiny random-init timm ViT and sklearn digits.

The ViT is timm's ``test_vit`` (6 blocks, width 64) at 32 px; the 8x8 digits are resized by the
backbone's preprocessing. Losses are compared with numpy computations of the papers' formulas,
frozen parameters bitwise, and backbone passes are counted with the wrapper's pass counter.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import clpeft.config
import clpeft.engine
from clpeft.backbones.mlp import MLPBackbone
from clpeft.backbones.timm_backbone import TimmBackbone
from clpeft.components.prompts.prefix_prompt import PrefixPrompt
from clpeft.data import Batch
from clpeft.errors import UserError
from clpeft.experience import Experience
from clpeft.strategies.coda_prompt import CodaPrompt
from clpeft.strategies.dualprompt import DualPrompt
from clpeft.strategies.l2p import L2P

METHODS = {
    "l2p": {"name": "l2p", "pool_size": 6, "prompt_length": 2, "top_k": 3},
    "dualprompt": {"name": "dualprompt", "pool_size": 5, "g_length": 2, "e_length": 3, "g_layers": [0], "e_layers": [1, 2]},
    "coda_prompt": {"name": "coda_prompt", "components_per_task": 3, "prompt_length": 4, "layers": [0, 1, 2], "ortho_weight": 0.1},
}
CLASSES = {"l2p": L2P, "dualprompt": DualPrompt, "coda_prompt": CodaPrompt}
BATCH, EPOCHS, PER_CLASS = 8, 2, 8


def _config(tmp_path, strategy: dict, feature_cache: str = "memory") -> dict:
    return {
        "seed": 0,
        "scenario": {
            "name": "class_incremental",
            "dataset": "sklearn_digits",
            "n_experiences": 5,
            "train_per_class": PER_CLASS,
            "test_per_class": 4,
            "root": str(tmp_path / "data"),
        },
        "backbone": {"name": "timm", "model": "test_vit", "img_size": 32, "freeze": True},
        "strategy": strategy,
        "train": {"epochs": EPOCHS, "batch_size": BATCH, "lr": 0.01, "optimizer": "adam", "feature_cache": feature_cache},
        "eval": {"batch_size": 64, "baseline": False},
        "logging": {"tensorboard": False, "progress": "never"},
    }


def _engine(tmp_path, strategy: dict, **kw):
    """An engine, its built run and the very strategy object the run trains (so tests can spy on it);
    run it with ``engine.run(built)``."""
    engine = clpeft.engine.Engine(clpeft.config.resolve(_config(tmp_path, strategy, **kw)), tmp_path / "run", device="cpu")
    built = engine.build()
    return engine, built, built.strategy


def _backbone(seed: int = 0) -> TimmBackbone:
    torch.manual_seed(seed)
    return TimmBackbone((1, 8, 8), model="test_vit", img_size=32, freeze=True)


def _digits(n: int = 6) -> torch.Tensor:
    from sklearn.datasets import load_digits

    images = load_digits().images[:n] * (255.0 / 16.0)
    return torch.from_numpy(np.rint(images).astype(np.uint8)).unsqueeze(1)


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().cpu().numpy()


def _masked_cross_entropy(logits: np.ndarray, y: np.ndarray, classes: list[int]) -> float:
    """Cross-entropy over the columns ``classes`` only (the official train_mask)."""
    z = logits[:, classes]
    z = z - z.max(1, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(1, keepdims=True))
    return float(-log_p[np.arange(len(y)), [classes.index(c) for c in y]].mean())


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a / np.linalg.norm(a, axis=-1, keepdims=True)) @ (b / np.linalg.norm(b, axis=-1, keepdims=True)).T


# --------------------------------------------------------------------------------------------
# engine runs
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", list(METHODS))
def test_one_backbone_pass_per_step_frozen_backbone_bitwise_and_prompts_learn(tmp_path, method):
    engine, built, strategy = _engine(tmp_path, METHODS[method])
    backbone_before = copy.deepcopy(strategy.backbone.state_dict())
    steps, in_step_passes, checked = [], [], []
    step = strategy.training_step

    def counted(batch):
        if not checked:  # the cached query is the frozen backbone's feature of the raw batch
            with torch.no_grad():
                checked.append(torch.equal(batch.features, strategy.backbone(batch.x)))
        before = passes.calls
        loss = step(batch)
        in_step_passes.append(passes.calls - before)
        steps.append(len(batch.y))
        return loss

    strategy.training_step = counted
    with strategy.backbone.count_passes() as passes:
        result = engine.run(built)
    assert checked == [True]
    assert len(steps) == 5 * EPOCHS * -(-2 * PER_CLASS // BATCH)
    assert sum(in_step_passes) / len(steps) <= 1.1 and set(in_step_passes) == {1}
    after = strategy.backbone.state_dict()
    assert all(torch.equal(v, after[k]) for k, v in backbone_before.items())
    trained = {n: p for n, p in strategy.named_parameters() if p.requires_grad}
    assert all(n.startswith(("prompt_", "head.")) for n in trained)
    assert np.asarray(result["acc_matrix"]).shape == (5, 5)


def test_without_the_cache_the_query_costs_a_second_pass(tmp_path):
    """The counter can tell: PILOT-style code recomputes the query, two passes per step."""
    engine, built, strategy = _engine(tmp_path, METHODS["l2p"], feature_cache="off")
    per_step = []
    step = strategy.training_step

    def counted(batch):
        assert batch.features is None
        before = passes.calls
        loss = step(batch)
        per_step.append(passes.calls - before)
        return loss

    strategy.training_step = counted
    with strategy.backbone.count_passes() as passes:
        engine.run(built)
    assert set(per_step) == {2}


def test_coda_components_of_past_tasks_do_not_change(tmp_path):
    engine, built, strategy = _engine(tmp_path, METHODS["coda_prompt"])
    at_start, at_end = [], []
    before, after = strategy.before_experience, strategy.after_experience

    def spy_before(exp):
        before(exp)
        at_start.append(copy.deepcopy(strategy.prompt_components.tasks[-1].state_dict()))

    def spy_after(exp):
        after(exp)
        at_end.append(copy.deepcopy(strategy.prompt_components.state_dict()))

    strategy.before_experience, strategy.after_experience = spy_before, spy_after
    engine.run(built)
    assert len(strategy.prompt_components.tasks) == 5
    final = strategy.prompt_components.state_dict()
    for t in range(5):
        block = {k.split(f"tasks.{t}.")[1]: v for k, v in final.items() if k.startswith(f"tasks.{t}.")}
        trained = {k.split(f"tasks.{t}.")[1]: v for k, v in at_end[t].items() if k.startswith(f"tasks.{t}.")}
        assert set(block) == {"prompts", "keys", "attention"}
        # bitwise what it was when its own experience ended ...
        assert all(torch.equal(block[k], trained[k]) for k in block)
        # ... after its own experience had moved every part of it
        assert all(not torch.equal(trained[k], at_start[t][k]) for k in block)


def test_dualprompt_trains_the_true_tasks_e_prompt_and_infers_with_the_nearest_key(tmp_path, monkeypatch):
    engine, built, strategy = _engine(tmp_path, METHODS["dualprompt"])
    calls = []
    forward = PrefixPrompt.forward

    def spy(self, query, task=None):
        out = forward(self, query, task)
        calls.append(
            {
                "task": task,
                "chosen": out.tasks.tolist(),
                "training": strategy.training,
                "exp": strategy.task,
                "query": _np(query),
                "keys": _np(self.e_keys[: int(self.n_tasks)]),
            }
        )
        return out

    monkeypatch.setattr(PrefixPrompt, "forward", spy)
    snapshots = []
    after = strategy.after_experience

    def spy_after(exp):
        after(exp)
        snapshots.append(copy.deepcopy(strategy.prompt_prefix.state_dict()))

    strategy.after_experience = spy_after
    engine.run(built)
    training = [c for c in calls if c["training"]]
    inference = [c for c in calls if not c["training"]]
    assert training and inference
    assert all(c["task"] == c["exp"] and set(c["chosen"]) == {c["exp"]} for c in training)
    for c in inference:
        assert c["task"] is None
        assert c["chosen"] == np.argmax(_cos(c["query"], c["keys"]), axis=1).tolist()
    assert {tuple(c["chosen"]) for c in inference} != {(0,) * len(inference[0]["chosen"])}  # keys do choose
    final = strategy.prompt_prefix.state_dict()
    for t in range(4):  # E-prompts and keys of past tasks stay as they were trained
        assert torch.equal(final["e_prompts"][t], snapshots[t]["e_prompts"][t])
        assert torch.equal(final["e_keys"][t], snapshots[t]["e_keys"][t])
    assert not torch.equal(final["g_prompt"], snapshots[0]["g_prompt"])  # the G-prompt keeps learning


@pytest.mark.parametrize("method", list(METHODS))
def test_state_dict_round_trip_gives_identical_predictions(tmp_path, method):
    engine, built, strategy = _engine(tmp_path, METHODS[method])
    engine.run(built)
    params = {k: v for k, v in METHODS[method].items() if k != "name"}
    fresh = CLASSES[method](_backbone(seed=123), **params)
    fresh.load_state_dict(copy.deepcopy(strategy.state_dict()))
    fresh.eval()
    x = _digits(12)
    with torch.no_grad():
        expected = strategy.predict(x)
        assert expected.shape == (12, 10)
        assert torch.equal(fresh.predict(x), expected)
        assert torch.equal(fresh.predict(x, query=strategy.backbone(x)), expected)


@pytest.mark.parametrize("method", list(METHODS))
def test_interrupted_run_resumes_to_the_same_matrix(tmp_path, method, interrupted_then_resumed):
    strategy = {**METHODS[method], "diversity": True} if method == "l2p" else METHODS[method]
    full, resumed = interrupted_then_resumed(_config(tmp_path, strategy), tmp_path)
    assert resumed == full


# --------------------------------------------------------------------------------------------
# hand-built checks
# --------------------------------------------------------------------------------------------


def _ready(strategy, classes=(2, 3), seen=4):
    exp = Experience(1, None, None, list(classes), list(range(seen)))
    strategy.before_experience(exp)
    strategy.train()
    return torch.tensor([2, 3, 3, 2, 2, 3])


def test_l2p_loss_is_masked_cross_entropy_plus_lambda_times_one_minus_cosine():
    strategy = L2P(_backbone(), pool_size=5, prompt_length=2, top_k=2, matching_weight=0.7)
    y = _ready(strategy)
    x = _digits()
    with torch.no_grad():
        query = strategy.backbone(x)
    loss = strategy.training_step(Batch(x, y, query))
    cos = _cos(_np(query), _np(strategy.prompt_pool.keys))
    idx = np.argsort(-cos, axis=1, kind="stable")[:, :2]
    prompts = torch.stack([torch.cat([strategy.prompt_pool.prompts[i] for i in row]) for row in idx])
    prompts = prompts + strategy.backbone.net.pos_embed[0, 0]  # the [CLS] position, as the official port
    with torch.no_grad():
        features = strategy.backbone.forward_prompted(x, prompts=prompts, pool="prompt_mean")
    logits = _np(features) @ _np(strategy.head.weight).T + _np(strategy.head.bias)
    matching = np.mean([(1 - cos[b, idx[b]]).sum() for b in range(len(y))])
    expected = _masked_cross_entropy(logits, y.numpy(), [2, 3]) + 0.7 * matching
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    loss.backward()  # the masked classes' head rows get no gradient
    assert strategy.head.weight.grad[:2].abs().sum() == 0 and strategy.head.weight.grad[2:].abs().sum() > 0


def test_dualprompt_loss_uses_the_current_tasks_prefixes_and_key():
    strategy = DualPrompt(_backbone(), pool_size=3, g_length=2, g_layers=[0], e_length=3, e_layers=[1, 2], matching_weight=0.5)
    strategy.before_experience(Experience(0, None, None, [0, 1], [0, 1]))
    y = _ready(strategy)
    assert strategy.task == 1
    x = _digits()
    with torch.no_grad():
        query = strategy.backbone(x)
    loss = strategy.training_step(Batch(x, y, query))
    p = strategy.prompt_prefix
    prefixes = {
        0: (p.g_prompt[0, 0], p.g_prompt[0, 1]),
        1: (p.e_prompts[1, 0, 0], p.e_prompts[1, 0, 1]),
        2: (p.e_prompts[1, 1, 0], p.e_prompts[1, 1, 1]),
    }
    with torch.no_grad():
        logits = _np(strategy.head(strategy.backbone.forward_prompted(x, prefixes=prefixes)))
    matching = np.mean(1 - _cos(_np(query), _np(p.e_keys))[:, 1])
    assert loss.item() == pytest.approx(_masked_cross_entropy(logits, y.numpy(), [2, 3]) + 0.5 * matching, rel=1e-5)


def test_coda_loss_is_masked_cross_entropy_plus_mu_times_orthogonality():
    strategy = CodaPrompt(_backbone(), components_per_task=3, prompt_length=4, layers=[0, 2], ortho_weight=0.3)
    strategy.before_experience(Experience(0, None, None, [0, 1], [0, 1]))
    y = _ready(strategy)
    with torch.no_grad():
        for p in strategy.prompt_components.tasks[1].parameters():
            p.add_(0.1 * torch.randn_like(p))
    x = _digits()
    with torch.no_grad():
        query = strategy.backbone(x)
    loss = strategy.training_step(Batch(x, y, query))
    q = _np(query)
    prefixes, ortho = {}, 0.0
    for li, layer in enumerate([0, 2]):
        P = np.concatenate([_np(t.prompts[li]) for t in strategy.prompt_components.tasks])
        K = np.concatenate([_np(t.keys[li]) for t in strategy.prompt_components.tasks])
        A = np.concatenate([_np(t.attention[li]) for t in strategy.prompt_components.tasks])
        alpha = np.stack([_cos(q * A[m], K[m][None])[:, 0] for m in range(6)], axis=1)
        prompt = torch.from_numpy(np.einsum("bm,mld->bld", alpha, P)).float()
        prefixes[layer] = (prompt[:, :2], prompt[:, 2:])
        for B in (P.reshape(6, -1), K, A):
            ortho += np.mean((B @ B.T - np.eye(6)) ** 2)
    with torch.no_grad():
        logits = _np(strategy.head(strategy.backbone.forward_prompted(x, prefixes=prefixes)))
    expected = _masked_cross_entropy(logits, y.numpy(), [2, 3]) + 0.3 * ortho
    assert ortho > 1e-3
    assert loss.item() == pytest.approx(expected, rel=1e-4)


def test_no_prompts_is_the_plain_backbone():
    x = _digits()
    for strategy in (L2P(_backbone(), prompt_length=0, top_k=1, pool_size=2), DualPrompt(_backbone(), g_length=0, e_length=0, pool_size=2)):
        strategy.before_experience(Experience(0, None, None, [0, 1], [0, 1]))
        strategy.eval()
        with torch.no_grad():
            assert torch.equal(strategy.predict(x), strategy.head(strategy.backbone(x)))


def test_prompt_methods_refuse_backbones_and_settings_they_cannot_use(tmp_path):
    mlp = MLPBackbone(input_shape=(1, 8, 8), hidden=[8])
    for cls in (L2P, DualPrompt, CodaPrompt):
        with pytest.raises(UserError, match="backbone.name: .* injects prompts into a vision transformer"):
            cls(mlp)
    bad = [
        ({"name": "l2p", "pool_size": 3, "top_k": 4}, "strategy.top_k"),
        ({"name": "coda_prompt", "prompt_length": 5}, "strategy.prompt_length"),
        ({"name": "dualprompt", "g_layers": [0, 1], "e_layers": [1, 2]}, "strategy.e_layers"),
    ]
    for strategy, key in bad:
        with pytest.raises(UserError, match=key):
            clpeft.config.resolve(_config(tmp_path, strategy))
    with pytest.raises(UserError, match=r"strategy.layers: layers \[6\] do not exist"):
        CodaPrompt(_backbone(), layers=[0, 6])
    dual = DualPrompt(_backbone(), pool_size=1)
    dual.before_experience(Experience(0, None, None, [0, 1], [0, 1]))
    with pytest.raises(UserError, match="strategy.pool_size"):
        dual.before_experience(Experience(1, None, None, [2, 3], [0, 1, 2, 3]))
