"""task_lora on the tiny random Llama: a mixed batch served in one pass equals each task's adapter
merged into a plain model, alone on its own examples; a finished task's adapter stays bit for bit;
the first task is kept where seq_finetune forgets it; the router's accuracy against a hand-computed
nearest centroid; resume; one-line errors."""

import dataclasses

import numpy as np
import pytest
import torch
from test_seq_finetune import _config
from transformers import AutoModelForCausalLM, AutoTokenizer

from clpeft.backbones.generative_lm import GenerativeLM
from clpeft.backbones.mlp import MLPBackbone
from clpeft.components.generative.task_adapters import TaskAdapterLinear
from clpeft.data import Batch
from clpeft.engine import Engine
from clpeft.errors import UserError
from clpeft.scenarios.instruction_incremental import InstructionIncremental
from clpeft.strategies.task_adapters import TaskLoRAServing

TARGETS = ["q_proj", "v_proj", "up_proj"]


def _tasks(paths, max_new_tokens=4):
    return [{"jsonl": str(p), "max_new_tokens": max_new_tokens} for p in paths]


def _layers(strategy) -> dict[str, TaskAdapterLinear]:
    return strategy.adapters.layers


def _merged(weights, strategy, k) -> GenerativeLM:
    """The plain pretrained model with adapter ``k`` folded into its weights: ``W + (alpha / r) B_k A_k``."""
    reference = GenerativeLM(weights=str(weights))
    with torch.no_grad():
        for name, layer in _layers(strategy).items():
            reference.net.get_submodule(name).weight += layer.scaling[k] * layer.lora_B[k] @ layer.lora_A[k]
    return reference


def test_a_mixed_batch_in_one_pass_equals_each_tasks_adapter_alone_on_its_own_examples(tiny_lm, distinct_tasks):
    first, second = InstructionIncremental(0, _tasks(distinct_tasks, 6)).experiences()
    # 15 tasks + the empty adapter: the prefill (7-token prompts x 16 adapters) takes MultiLoRALinear's gathered
    # path, each decoding step (1 token) its all-adapters path
    strategy = TaskLoRAServing(GenerativeLM(weights=str(tiny_lm)), max_tasks=15, lora_targets=TARGETS, lora_rank=4).eval()
    torch.manual_seed(0)
    with torch.no_grad():
        for layer in _layers(strategy).values():  # adapters 0 and 1 as if trained
            layer.lora_B[:2].normal_(std=0.3)
    strategy.before_experience(second)  # both tasks' test prompts are known
    strategy.adapters.train_task(None)
    a, b = first.test.load()[0][:5], second.test.load()[0][:5]
    a[1] = type(a[1])(a[1].prompt + "cd", a[1].target, max_new_tokens=6)  # a longer prompt: left padding in the mixed batch
    mixed = [a[0], b[0], b[1], a[1], a[2], b[2], a[3], a[4], b[3], b[4]]
    tasks = torch.tensor([strategy.task_of.get(e, -1) for e in mixed])
    assert tasks.tolist() == [0, 1, 1, -1, 0, 1, 0, 0, 1, 1]  # a[1] (changed) belongs to no task: the empty adapter
    ids = strategy.adapter_of(mixed)
    assert ids.tolist() == [0, 1, 1, 15, 0, 1, 0, 0, 1, 1]

    with strategy.adapters.routed(ids):
        answers = strategy.backbone.generate(mixed, 6)
        logits, targets, rows = strategy.backbone.answer_logits(mixed)
    references = {k: _merged(tiny_lm, strategy, k) for k in (0, 1, 15)}
    alone = {k: [e for e, i in zip(mixed, ids.tolist()) if i == k] for k in references}
    expected = {k: iter(references[k].generate(alone[k], 6)) for k in references}
    assert answers == [next(expected[k]) for k in ids.tolist()]
    assert len(set(answers[i] for i in (0, 1, 3))) == 3  # the two adapters and the pretrained model answer differently
    for k, reference in references.items():
        ref_logits, ref_targets, _ = reference.answer_logits(alone[k])
        mine = torch.cat([logits[rows == r] for r, i in enumerate(ids.tolist()) if i == k])
        assert torch.equal(torch.cat([targets[rows == r] for r, i in enumerate(ids.tolist()) if i == k]), ref_targets)
        torch.testing.assert_close(mine, ref_logits, atol=1e-5, rtol=1e-5)
    plain = GenerativeLM(weights=str(tiny_lm))  # outside routing, no task in training: the pretrained model
    torch.testing.assert_close(strategy.backbone.answer_logits(mixed)[0], plain.answer_logits(mixed)[0], atol=0, rtol=0)


def test_training_the_second_task_leaves_the_first_tasks_adapter_bit_identical(tiny_lm, distinct_tasks, tmp_path):
    cfg = _config(_tasks(distinct_tasks), tiny_lm, epochs=2, name="task_lora", max_tasks=3)
    cfg = dataclasses.replace(cfg, train=cfg.train.model_copy(update={"optimizer": "adamw", "weight_decay": 0.5}))  # decay would move them
    engine = Engine(cfg, tmp_path / "run", device="cpu")
    built = engine.build()
    strategy = built.strategy
    pretrained = {n: p.detach().clone() for n, p in strategy.backbone.net.named_parameters() if "lora_" not in n}
    snapshots = []
    finish = strategy.after_experience

    def spied(exp):
        finish(exp)
        snapshots.append({n: p.detach().clone() for n, p in strategy.backbone.net.named_parameters() if "lora_" in n})

    strategy.after_experience = spied
    engine.run(built)
    after_first, after_second = snapshots
    for name, value in after_second.items():
        assert torch.equal(value[0], after_first[name][0]), name  # task 0's adapter: untouched by task 1's AdamW steps
        assert torch.equal(value[2:], after_first[name][2:]), name  # the unused slot and the empty adapter too
    assert all(not v[1:].any() for n, v in after_first.items() if n.endswith("lora_B"))  # task 1's and the rest start at B = 0
    assert all(after_second[n][1].any() for n in after_second if n.endswith("lora_B"))  # ... and task 1 trained its own
    assert all(v[0].any() for n, v in after_first.items() if n.endswith("lora_B"))
    for name, value in strategy.backbone.net.named_parameters():  # the pretrained model: frozen, unchanged
        if "lora_" not in name:
            assert not value.requires_grad and torch.equal(value, pretrained[name]), name


@pytest.mark.parametrize("routing", ["task_id", "router"])
def test_task_lora_keeps_the_first_task_that_seq_finetune_forgets(routing, tiny_lm, distinct_tasks, tmp_path):
    result = Engine(_config(_tasks(distinct_tasks), tiny_lm, name="task_lora", routing=routing), tmp_path / "run", device="cpu").run()
    R = np.asarray(result["acc_matrix"])
    assert R[0, 0] == 1.0 and R[1, 1] == 1.0 and R[1, 0] == 1.0  # isolation: nothing of task 0 is overwritten
    assert R[0, 1] == result["baseline"][1] == 0.0  # an untrained task gets the pretrained model (task_id) or task 0's adapter
    assert result["metrics"]["router_accuracy"] == 1.0 and result["metrics"]["router_task_accuracy"] == [1.0, 1.0]
    seq = Engine(_config(_tasks(distinct_tasks), tiny_lm), tmp_path / "seq", device="cpu").run()
    assert seq["acc_matrix"][1][0] <= 0.2  # the same stream, one LoRA: the first task is forgotten


def _hand_embedding(model, tokenizer, prompt: str) -> torch.Tensor:
    """Mean over the prompt's tokens (no chat template: ``prompt + "\\n"``) of the plain model's last hidden state."""
    ids = torch.tensor([tokenizer(prompt + "\n")["input_ids"]])
    with torch.no_grad():
        return model.model(input_ids=ids).last_hidden_state[0].double().mean(0)


def test_router_accuracy_is_the_nearest_task_centroid_computed_by_hand(tiny_lm, two_tasks, tmp_path):
    # two tasks of the same kind of prompts ("q <letters>" -> "ab", then -> "ba"): the router can only guess
    engine = Engine(_config(_tasks(two_tasks), tiny_lm, epochs=1, name="task_lora", routing="router"), tmp_path / "run", device="cpu")
    result = engine.run()
    model, tokenizer = AutoModelForCausalLM.from_pretrained(tiny_lm).eval(), AutoTokenizer.from_pretrained(tiny_lm)
    stream = engine.built.stream
    centroids = torch.stack(
        [torch.stack([_hand_embedding(model, tokenizer, e.prompt) for e in exp.train.load()[0]]).mean(0) for exp in stream]
    )
    torch.testing.assert_close(engine.built.strategy.router.centroids(), centroids, atol=1e-6, rtol=1e-6)
    expected = []
    for exp in stream:
        tests = exp.test.load()[0]
        nearest = [int(((centroids - _hand_embedding(model, tokenizer, e.prompt)) ** 2).sum(1).argmin()) for e in tests]
        assert engine.built.strategy.adapter_of(tests).tolist() == nearest
        expected.append(np.mean([k == exp.index for k in nearest]))
    assert 0 < np.mean(expected) < 1  # neither all right nor all wrong: the hand computation is a real check
    assert result["metrics"]["router_task_accuracy"] == pytest.approx(expected)
    assert result["metrics"]["router_accuracy"] == pytest.approx(np.mean(expected))  # equal test sizes


def test_a_run_stopped_after_the_first_task_resumes_to_the_same_matrix(tiny_lm, distinct_tasks, tmp_path):
    cfg = _config(_tasks(distinct_tasks), tiny_lm, epochs=4, name="task_lora", routing="router")
    result = Engine(cfg, tmp_path / "run", device="cpu").run()
    for lost in (tmp_path / "run" / "checkpoints").glob("exp_001.pt*"):  # killed during the second task
        lost.unlink()
    (tmp_path / "run" / "metrics.json").unlink()
    resumed = Engine(cfg, tmp_path / "run", device="cpu", resume=True)
    again = resumed.run()
    assert again["acc_matrix"] == result["acc_matrix"]
    assert {k: v for k, v in again["metrics"].items()} == result["metrics"]  # router accuracy and perplexity included
    assert resumed.built.strategy.router.counts.tolist()[:2] == [38, 38]  # task 0's centroid came back from the checkpoint


def test_one_line_errors(tiny_lm, distinct_tasks, tmp_path):
    with pytest.raises(UserError, match="use backbone.name: generative_lm") as err:
        TaskLoRAServing(MLPBackbone(input_shape=(4,), hidden=[8]))
    assert "\n" not in str(err.value) and err.value.key == "backbone.name"
    with pytest.raises(UserError, match="the stream has 2 tasks but the pool holds 1; set it to 2") as err:
        Engine(_config(_tasks(distinct_tasks), tiny_lm, name="task_lora", max_tasks=1), tmp_path / "run", device="cpu").run()
    assert "\n" not in str(err.value) and err.value.key == "strategy.max_tasks"
    with pytest.raises(UserError) as err:
        TaskLoRAServing(GenerativeLM(weights=str(tiny_lm)), lora_targets=["nowhere"])
    assert "\n" not in str(err.value) and err.value.key == "strategy.lora_targets"
    first, _ = InstructionIncremental(0, _tasks(distinct_tasks)).experiences()
    strategy = TaskLoRAServing(GenerativeLM(weights=str(tiny_lm)), max_tasks=1)
    strategy.before_experience(first)
    assert strategy.training_step(Batch(first.train.load()[0][:2], None)).requires_grad


def test_gradient_checkpointing_recomputes_with_the_task_in_training(tiny_lm, distinct_tasks):
    # the backward pass re-runs each decoder layer outside training_step: it must see the same adapter
    _, second = InstructionIncremental(0, _tasks(distinct_tasks)).experiences()
    examples = second.train.load()[0][:4]
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        strategy = TaskLoRAServing(GenerativeLM(weights=str(tiny_lm), gradient_checkpointing=checkpointing), max_tasks=2).train()
        with torch.no_grad():
            for layer in _layers(strategy).values():
                layer.lora_B.normal_(std=0.3)
        strategy.before_experience(second)
        strategy.training_step(Batch(examples, None)).backward()
        grads.append([p.grad for p in strategy.adapters.parameters()])
    for plain, recomputed in zip(*grads):
        assert plain[1].any() and not plain[[0, 2]].any()  # only task 1's slice gets a gradient
        torch.testing.assert_close(recomputed, plain, atol=1e-6, rtol=1e-5)
