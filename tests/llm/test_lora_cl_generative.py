"""lora_cl on a generative LLM (the tiny random Llama): InfLoRA's covariances count the training examples'
real tokens only (against a padded batch masked by hand), a designed update leaves the outputs of earlier
tasks' training inputs unchanged, the other options train and start their updates at zero on the LLM's
LoRA layers, an engine run fills the matrix and resumes exactly, and the classifier path's keys are refused
in one line."""

import json
import string

import numpy as np
import pytest
import torch

import clpeft.config
from clpeft.backbones.generative_lm import GenerativeLM
from clpeft.components.lora.input_moments import input_moments
from clpeft.data import Batch
from clpeft.data_access import DataAccess
from clpeft.engine import Engine
from clpeft.errors import UserError
from clpeft.scenarios.instruction_incremental import InstructionIncremental
from clpeft.strategies.lora_cl import LoRACL

ALMOST_ALL = 1 - 1e-9  # a threshold that keeps every direction the inputs have (their energies are far above 1e-9)


def _tasks(tmp_path, specs, train=1) -> list[str]:
    """One directory per ``(prefix, letters, target)``: ``train`` prompts ``<prefix> <1-6 of letters>``
    (lengths differ, so batches are padded) and two test prompts."""
    rng = np.random.default_rng(0)
    dirs = []
    for prefix, letters, target in specs:
        d = tmp_path / prefix
        d.mkdir()
        for split, n in (("train", train), ("test", 2)):
            with (d / f"{split}.jsonl").open("w") as f:
                for _ in range(n):
                    prompt = f"{prefix} " + "".join(rng.choice(list(letters), int(rng.integers(1, 7))))
                    f.write(json.dumps({"prompt": prompt, "target": target}) + "\n")
        dirs.append(str(d))
    return dirs


def _stream(dirs):
    stream = InstructionIncremental(0, [{"jsonl": d, "max_new_tokens": 4} for d in dirs]).experiences()
    for exp in stream:
        exp.stream_length = len(stream)
    return stream


def _strategy(tiny_lm, **options) -> LoRACL:
    strategy = LoRACL(GenerativeLM(weights=str(tiny_lm)), general_text_samples=0, **options)
    strategy.attach(DataAccess(torch.device("cpu"), None, strategy.backbone, batch_size=8))
    return strategy


def _logits(strategy, exp) -> list[torch.Tensor]:
    """The logits at every position of each training example (prompt and answer), run alone."""
    with torch.no_grad():
        return [strategy.backbone.net(input_ids=strategy.backbone.training_batch([e])[0]).logits for e in exp.train.load()[0]]


def _train(strategy, exp, steps=8, lr=0.2) -> list[float]:
    """``before_experience``, a few Adam steps on the whole training set, ``after_experience``; the losses."""
    strategy.before_experience(exp)
    examples = exp.train.load()[0]
    losses = []
    optimizer = None
    for _ in range(steps):
        if optimizer is None:  # (re)built when after_training_step grew the ranks
            optimizer = torch.optim.Adam([p for p in strategy.parameters() if p.requires_grad], lr=lr)
        optimizer.zero_grad()
        loss = strategy.training_step(Batch(examples, torch.zeros(len(examples), dtype=torch.long)))
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
        if strategy.after_training_step():
            optimizer = None
    strategy.after_experience(exp)
    return losses


def _relative_change(before, after) -> float:
    return max(float((a - b).norm() / b.norm()) for a, b in zip(after, before))


def test_the_covariances_count_the_real_prompt_and_answer_tokens_only(tiny_lm, tmp_path):
    (exp,) = _stream(_tasks(tmp_path, [("q", "abcdefgh", "ab")], train=12))
    strategy = _strategy(tiny_lm, targets=["q_proj", "v_proj"], subspace="inflora")
    examples = exp.train.load()[0]
    ids, mask, _ = strategy.backbone.training_batch(examples)
    assert (mask == 0).any()  # the prompts' lengths differ: a batch of them is padded

    seen = {name: [] for name in strategy.lora}
    hooks = [
        layer.register_forward_pre_hook(lambda _m, args, name=name: seen[name].append(args[0].detach().double()))
        for name, layer in strategy.lora.items()
    ]
    with torch.no_grad():
        strategy.backbone.net(input_ids=ids, attention_mask=mask, use_cache=False)
    for hook in hooks:
        hook.remove()
    real = mask.bool()  # the prompt and answer tokens (with end-of-sequence) of every example
    for covariance, name in zip(strategy._input_covariances(exp), strategy.lora, strict=True):
        x = seen[name][0][real]
        torch.testing.assert_close(covariance, x.T @ x / len(x), rtol=1e-5, atol=1e-7)
        padded = seen[name][0].flatten(0, 1)
        assert not torch.allclose(covariance, padded.T @ padded / len(padded), rtol=1e-3, atol=1e-5)  # padding would show


def test_a_sharded_ranks_idle_forward_counts_no_token_and_gives_finite_zero_gradients(tiny_lm):
    """An FSDP rank with an empty share runs one masked pad token (:func:`clpeft.fsdp._idle_forward`): in
    training mode PRILoRA's input statistics stay empty, and ``logits.sum() * 0`` backpropagates zeros, not NaN."""
    from clpeft.fsdp import _idle_forward

    strategy = LoRACL(GenerativeLM(weights=str(tiny_lm)), general_text_samples=0, rank_budget=3)
    strategy.train()
    _idle_forward(strategy.backbone).logits.sum().mul(0.0).backward()
    assert all(int(layer.input_count) == 0 for layer in strategy.lora.values())
    grads = [p.grad for p in strategy.parameters() if p.grad is not None]
    assert grads and all(torch.equal(g, torch.zeros_like(g)) for g in grads)


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "gradient_checkpointing"])
def test_rank_budget_statistics_count_the_real_tokens_of_a_padded_batch_only(tiny_lm, tmp_path, checkpointing):
    """PRILoRA's input statistics, gathered while training on a right-padded batch, equal the mean square of the
    examples' real tokens run one at a time (also where checkpointing recomputes the forward in the backward
    pass); garbage tokens in the padding give the same scores as the pad token there."""
    (exp,) = _stream(_tasks(tmp_path, [("q", "abcdefgh", "ab")], train=12))
    strategy = LoRACL(GenerativeLM(weights=str(tiny_lm), gradient_checkpointing=checkpointing), general_text_samples=0, rank_budget=3)
    strategy.attach(DataAccess(torch.device("cpu"), None, strategy.backbone, batch_size=8))
    examples = exp.train.load()[0]
    ids, mask, _ = strategy.backbone.training_batch(examples)
    assert (mask == 0).any()
    strategy.eval()  # evaluation passes never count
    moments = input_moments(strategy.lora, lambda: strategy.generative.run_alone(examples))
    assert all(int(layer.input_count) == 0 for layer in strategy.lora.values())

    strategy.train()
    strategy.training_step(Batch(examples, torch.zeros(len(examples), dtype=torch.long))).backward()
    padded_means = []
    for name, layer in strategy.lora.items():
        _, outer, count = moments[name]
        torch.testing.assert_close(layer.input_sq_mean.double(), outer.diagonal() / count, rtol=1e-5, atol=1e-8)
        assert count == int(mask.sum()) and int(layer.input_count) == count * (
            2 if checkpointing else 1
        )  # a recomputed forward counts again
        padded_means.append(layer.input_sq_mean.clone())
        layer.reset_importance()

    garbage = ids.masked_scatter(mask == 0, torch.randint(3, 40, (int((mask == 0).sum()),)))
    scores = {}
    for tokens in (ids, garbage):
        with torch.no_grad():
            strategy.backbone.net(input_ids=tokens, attention_mask=mask, use_cache=False)
        scores[len(scores)] = [layer.importance() for layer in strategy.lora.values()]
        for layer in strategy.lora.values():
            layer.reset_importance()
    for clean, dirty in zip(scores[0], scores[1], strict=True):
        torch.testing.assert_close(clean, dirty, rtol=1e-6, atol=0)
    # what the statistics were before the mask: every position of the padded batch, plainly different
    unmasked = []
    for layer in strategy.lora.values():
        layer.register_forward_pre_hook(lambda _m, args: unmasked.append(args[0].detach().flatten(0, 1).square().mean(0)))
    with torch.no_grad():
        strategy.backbone.net(input_ids=garbage, attention_mask=mask, use_cache=False)
    assert all(not torch.allclose(u, m, rtol=0.05) for u, m in zip(unmasked, padded_means, strict=True))


@pytest.mark.parametrize("criterion", ["inflora", "gpm"])
def test_a_designed_update_leaves_earlier_training_inputs_outputs_unchanged(tiny_lm, tmp_path, criterion):
    # one training example per task (about ten tokens), each task with its own letters: every layer's inputs
    # span far less than the hidden size (32), and each task brings more new directions than the rank
    stream = _stream(_tasks(tmp_path, [("q", "abcdefgh", "ab"), ("r", "ijklmnop", "ij"), ("s", "qrstuvwx", "qr")]))
    strategy = _strategy(tiny_lm, targets=["q_proj", "v_proj"], rank=2, subspace=criterion, subspace_threshold=ALMOST_ALL)
    outputs = []
    for exp in stream:
        if exp.index:
            strategy.before_experience(exp)  # designs A; _train calls it again, which designs the same A
            for i, layer in enumerate(strategy.lora.values()):
                basis = strategy.subspace.basis(i)
                assert 0 < basis.shape[1] < basis.shape[0]
                assert not layer.lora_A.requires_grad and layer.lora_A.abs().sum() > 0
                assert float((layer.lora_A.double() @ basis).abs().max()) < 1e-6  # A's rows outside the stored inputs
        before = _logits(strategy, exp)
        losses = _train(strategy, exp)
        assert losses[-1] < losses[0] - 0.1, losses  # B learns the task
        assert _relative_change(before, _logits(strategy, exp)) > 1e-2
        outputs.append([_logits(strategy, e) for e in stream])
    # the second task's training inputs: unchanged by the third task's update
    assert _relative_change(outputs[1][1], outputs[2][1]) < 2e-6
    first_kept = _relative_change(outputs[0][0], outputs[1][0])
    if criterion == "gpm":
        assert first_kept < 2e-6  # GPM's rule keeps all of the first task's directions too
    else:
        assert first_kept > 1e-4  # the official update_DualGPM keeps one fewer after the first task


def test_a_nearly_full_subspace_designs_only_the_directions_left_and_keeps_earlier_outputs(tiny_lm, tmp_path):
    # the first task's prompts draw from 36 characters (over 40 distinct tokens with the answers' and specials):
    # its subspace fills the hidden size (32), or all but fewer directions than the rank, and the official design
    # would complete the second task's A with directions inside it
    alphabet = string.ascii_lowercase + string.digits
    first, second = _stream(_tasks(tmp_path, [("q", alphabet, "ab"), ("r", "ijklmnop", "ij")], train=24))
    rank = 4
    strategy = _strategy(tiny_lm, targets=["q_proj", "v_proj"], rank=rank, subspace="gpm", subspace_threshold=ALMOST_ALL)
    _train(strategy, first)
    kept = _logits(strategy, first)
    strategy.before_experience(second)
    covariances = strategy._input_covariances(second)
    completed = 0
    for i, (layer, cov) in enumerate(zip(strategy.lora.values(), covariances, strict=True)):
        basis = strategy.subspace.basis(i)
        left = basis.shape[0] - basis.shape[1]
        assert left < rank
        a = layer.lora_A.detach().double()
        rows = int(a.abs().sum(1).gt(0).sum())
        assert rows <= left and not a[rows:].any()  # the directions left, then zero rows
        assert float((a @ basis).abs().max()) < 1e-6
        official = torch.linalg.svd(cov - basis @ (basis.T @ cov))[0][:, :rank].T
        completed += float((official[rows:] @ basis).norm()) > 0.5  # the official rows past them: inside the subspace
    assert completed == len(strategy.lora)
    _train(strategy, second)
    assert _relative_change(kept, _logits(strategy, first)) < 2e-6


@pytest.mark.parametrize(
    "options",
    [
        {"old_updates": "merge"},
        {"rank_budget": 3},
        {"rank_budget": 12, "grow_every": 2},
        {"rank_schedule": "linear", "max_rank": 3},
        {"init": "eva"},
        {"adapter": "dora", "old_updates": "merge"},
        {"adapter": "pissa"},
        {"adapter": "vera"},
        {"adapter": "lora_xs"},
        {"adapter": "adalora"},
    ],
    ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()),
)
def test_the_other_options_train_and_start_each_update_at_zero_on_the_llm(tiny_lm, distinct_tasks, options):
    torch.manual_seed(0)  # the new updates' random initialisation, whatever ran before (passes for seeds 0-5)
    first, second = _stream([str(d) for d in distinct_tasks])
    strategy = _strategy(tiny_lm, targets=["q_proj", "v_proj"], rank=2, alpha=4.0, **options)
    losses = _train(strategy, first)
    assert losses[-1] < losses[0]
    if "rank_budget" in options:
        assert sum(layer.frozen_rank for layer in strategy.lora.values()) in (3, 12)  # the retired update has the budget's rank
    before = _logits(strategy, second)
    strategy.before_experience(second)  # a new update (EVA's A, PiSSA's principal part, ...) that adds nothing yet
    assert _relative_change(before, _logits(strategy, second)) < 1e-5
    assert np.isfinite(_train(strategy, second)).all()


def _config(dirs, weights, **strategy):
    return clpeft.config.resolve(
        {
            "seed": 0,
            "scenario": {"name": "instruction_incremental", "tasks": [{"jsonl": d, "max_new_tokens": 4} for d in dirs]},
            "backbone": {"name": "generative_lm", "weights": str(weights)},
            "strategy": {"name": "lora_cl", "targets": ["q_proj", "k_proj", "v_proj", "o_proj"], "rank": 4, **strategy},
            "train": {"epochs": 8, "batch_size": 8, "lr": 0.01, "optimizer": "adam"},
            "eval": {"batch_size": 32, "baseline": True},
            "logging": {"tensorboard": False, "progress": "never"},
        }
    )


def test_an_inflora_run_fills_the_matrix_and_resumes_exactly(tiny_lm, distinct_tasks, tmp_path):
    cfg = _config([str(d) for d in distinct_tasks], tiny_lm, subspace="inflora", general_text_samples=4)
    result = Engine(cfg, tmp_path / "run", device="cpu").run()
    R = np.asarray(result["acc_matrix"])
    assert R.shape == (2, 2) and result["baseline"] == [0.0, 0.0]
    assert R[0, 0] == 1.0 and R[1, 1] >= 0.5
    assert result["metrics"]["perplexity_after"] > 0 and "final_confusion" not in result

    for lost in (tmp_path / "run" / "checkpoints").glob("exp_001.pt*"):  # killed during the second task
        lost.unlink()
    (tmp_path / "run" / "metrics.json").unlink()
    resumed = Engine(cfg, tmp_path / "run", device="cpu", resume=True).run()
    assert resumed["acc_matrix"] == result["acc_matrix"]
    assert resumed["metrics"] == result["metrics"]


def test_the_default_targets_adapt_query_and_value_and_the_head_keys_are_refused(tiny_lm, tmp_path):
    lm = GenerativeLM(weights=str(tiny_lm))
    strategy = LoRACL(lm, general_text_samples=0)  # targets left at the ViT default
    assert set(strategy.lora) == {n for n, _ in lm.net.named_modules() if n.endswith(("q_proj", "v_proj"))}
    for key, value in (("train_mask", False), ("align", True)):
        with pytest.raises(UserError, match=rf"^strategy.{key}: on a generative_lm backbone lora_cl trains no head"):
            LoRACL(GenerativeLM(weights=str(tiny_lm)), **{key: value})
    with pytest.raises(UserError, match=r"^strategy.targets: no nn.Linear layer of LlamaForCausalLM ends with \['qkv'\]"):
        LoRACL(GenerativeLM(weights=str(tiny_lm)), targets=["q_proj", "qkv"])
    with pytest.raises(UserError, match=r"^strategy.grow_every: grow_every cannot grow InfLoRA updates"):
        LoRACL(GenerativeLM(weights=str(tiny_lm)), subspace="inflora", rank_budget=8, grow_every=2)


def test_general_text_samples_is_refused_on_a_classifier():
    from clpeft.backbones.mlp import MLPBackbone

    with pytest.raises(UserError, match=r"^strategy.general_text_samples: applies to a generative_lm backbone only"):
        LoRACL(MLPBackbone(input_shape=(8,), hidden=[4]), targets=["net.0"], general_text_samples=8)
