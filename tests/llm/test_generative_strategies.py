"""replay, ewc, lwf and joint on a generative LLM (the tiny random Llama): what each keeps of the first
task that seq_finetune forgets, and each one's loss against an independent computation."""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_seq_finetune import _config

from clpeft.backbones.generative_lm import GenerativeLM
from clpeft.data import Batch
from clpeft.engine import Engine
from clpeft.errors import UserError
from clpeft.scenarios.instruction_incremental import InstructionIncremental

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"]


def _matrix(tasks, weights, root, name, **strategy) -> np.ndarray:
    cfg = _config([{"jsonl": str(p), "max_new_tokens": 4} for p in tasks], weights, name=name, **strategy)
    return np.asarray(Engine(cfg, root / name, device="cpu").run()["acc_matrix"])


def _stream(tasks):
    return InstructionIncremental(0, [{"jsonl": str(p), "max_new_tokens": 4} for p in tasks]).experiences()


@pytest.mark.parametrize(("name", "strategy"), [("seq_finetune", {}), ("replay", {"mem_size": 48}), ("joint", {})])
def test_replay_and_joint_keep_the_first_task_that_seq_finetune_forgets(name, strategy, tiny_lm, distinct_tasks, tmp_path):
    R = _matrix(distinct_tasks, tiny_lm, tmp_path, name, **strategy)
    assert R[0, 0] == 1.0 and R[1, 1] >= 0.8
    if name == "seq_finetune":
        assert R[1, 0] <= 0.2  # the second task's answer overwrites the first one's
    else:
        assert R[1, 0] >= 0.8  # the first task's examples are still trained on


def test_replay_ratio_mixes_that_share_of_the_memory(tiny_lm, distinct_tasks):
    from clpeft.strategies.replay import Replay

    first, second = _stream(distinct_tasks)
    replay = Replay(GenerativeLM(weights=str(tiny_lm)), mem_size=30, ratio=0.25, lora_targets=["q_proj"])
    replay.after_experience(first)  # the memory keeps 30 of the first task's examples
    torch.manual_seed(0)
    data = replay.train_data(second)
    assert len(second.train) == 38 and len(data) == 38 + round(0.25 * 38)
    prompts = [e.prompt for e in data.load()[0]]
    assert sum(p.startswith("q") for p in prompts) == round(0.25 * 38)  # the replayed ones are the first task's


def test_lora_keys_are_refused_on_a_classification_backbone():
    from clpeft.backbones.mlp import MLPBackbone
    from clpeft.strategies.ewc import EWC

    with pytest.raises(UserError, match=r"strategy.lora_rank: applies to a generative_lm backbone only"):
        EWC(MLPBackbone(input_shape=(4,), hidden=[4]), lora_rank=4)


def test_ewc_fisher_is_the_mean_squared_gradient_of_each_answers_log_likelihood(tiny_lm, distinct_tasks):
    from clpeft.strategies.ewc import EWC

    ewc = EWC(GenerativeLM(weights=str(tiny_lm)), lora_targets=["q_proj", "v_proj"], lora_rank=2)
    torch.manual_seed(0)
    for name, p in ewc.named_parameters():  # as if trained: B no longer zero, so A has gradients too
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.3)
    examples = _stream(distinct_tasks)[0].train.load()[0][:5]
    trained = {n: p for n, p in ewc.named_parameters() if p.requires_grad}
    fisher = ewc.generative.fisher([Batch(examples[:2], None), Batch(examples[2:], None)], trained)

    backbone = ewc.backbone
    expected = {n: torch.zeros_like(p) for n, p in trained.items()}
    for e in examples:  # log p(answer | prompt) from the full sequence's logits, one example at a time
        prompt, answer = backbone.prompt_ids(e.prompt), backbone.answer_ids(e.target)
        ids = torch.tensor([prompt + answer])
        log_probs = F.log_softmax(backbone.net(input_ids=ids).logits[0, len(prompt) - 1 : -1], dim=-1)
        log_likelihood = log_probs.gather(1, torch.tensor(answer)[:, None]).sum()
        for (n, _), g in zip(trained.items(), torch.autograd.grad(log_likelihood, list(trained.values()), allow_unused=True)):
            if g is not None:
                expected[n] += g.pow(2) / len(examples)
    assert any("lora_A" in n and f.abs().sum() > 0 for n, f in fisher.items())
    assert fisher["head.weight"].abs().sum() == 0  # the unused classification head has no information
    for n in trained:
        torch.testing.assert_close(fisher[n], expected[n], rtol=1e-4, atol=1e-9)


def test_lwf_loss_is_the_answer_loss_plus_alpha_times_the_token_distillation_from_the_old_model(tiny_lm, distinct_tasks):
    from clpeft.strategies.lwf import LwF

    first, second = _stream(distinct_tasks)
    lwf = LwF(GenerativeLM(weights=str(tiny_lm)), alpha=3.0, temperature=2.0, lora_targets=TARGETS, lora_rank=2)
    lwf.before_experience(first)
    torch.manual_seed(0)
    for name, p in lwf.named_parameters():  # the first task's adapters
        if "lora_B" in name:
            torch.nn.init.normal_(p, std=0.3)
    examples = second.train.load()[0][:4]
    assert lwf.training_step(Batch(examples, None)).item() == pytest.approx(lwf.backbone.loss(examples).item())  # no old model yet
    lwf.after_experience(first)

    old_net = copy.deepcopy(lwf.backbone.net)  # the old model, independently: a whole copy
    lwf.before_experience(second)
    loss = lwf.training_step(Batch(examples, None))
    assert loss.item() == pytest.approx(lwf.backbone.loss(examples).item(), rel=1e-6)  # the student is its teacher yet: L_old = 0
    with torch.no_grad():
        for name, p in lwf.named_parameters():  # one training step later
            if "lora_" in name:
                p.add_(0.05 * torch.randn_like(p))

    ids, mask, labels = lwf.backbone.training_batch(examples)
    at = labels[:, 1:] != -100
    student = lwf.backbone.net(input_ids=ids, attention_mask=mask).logits[:, :-1][at]
    with torch.no_grad():
        teacher = old_net(input_ids=ids, attention_mask=mask).logits[:, :-1][at]
    ce = F.cross_entropy(student, labels[:, 1:][at])
    kl = (F.softmax(teacher / 2, -1) * (F.log_softmax(teacher / 2, -1) - F.log_softmax(student / 2, -1))).sum(-1).mean()
    assert kl > 1e-4
    assert lwf.training_step(Batch(examples, None)).item() == pytest.approx((ce + 3.0 * kl).item(), rel=1e-5)


def test_ewc_holds_the_adapters_near_the_first_tasks_where_its_fisher_is_large(tiny_lm, distinct_tasks, tmp_path):
    drift = {}
    for ewc_lambda in (0.0, 1e6):  # lambda 0 trains as seq_finetune does, and records the same first term
        cfg = _config([{"jsonl": str(p), "max_new_tokens": 4} for p in distinct_tasks], tiny_lm, 4, "ewc", ewc_lambda=ewc_lambda)
        engine = Engine(cfg, tmp_path / f"ewc{ewc_lambda}", device="cpu")
        engine.run()
        strategy = engine.built.strategy
        first = strategy.penalty.terms[0]  # the first task's anchors and Fisher
        assert first and all(".lora_" in n or n.startswith("head.") for n in first)
        drift[ewc_lambda] = sum(float((f * (dict(strategy.named_parameters())[n] - a) ** 2).sum()) for n, (a, f) in first.items())
    assert drift[1e6] < 0.5 * drift[0.0], drift  # sum_i F_i (theta_i - theta*_i)^2 after the second task
