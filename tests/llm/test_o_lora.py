"""o_lora: the orthogonality and L2 terms against a hand-worked example and the paper's formula, the
strategy's loss on the tiny Llama, a new LoRA per task (past ones frozen, outputs unchanged), and
a run through the engine that resumes exactly."""

import math

import numpy as np
import pytest
import torch
from test_seq_finetune import _config

from clpeft.backbones.generative_lm import GenerativeLM
from clpeft.components.lora import LoRALinear
from clpeft.components.lora.orthogonal_subspace import current_l2, orthogonality_loss
from clpeft.data import Batch
from clpeft.engine import Engine
from clpeft.scenarios.instruction_incremental import InstructionIncremental


def _layer(past_a, a, b) -> LoRALinear:
    layer = LoRALinear(torch.nn.Linear(3, 2), rank=len(past_a), alpha=1.0)
    with torch.no_grad():
        layer.lora_A.copy_(torch.tensor(past_a))
    layer.new_update(len(a), 1.0, old="freeze")  # the past task's A becomes frozen_A
    with torch.no_grad():
        layer.lora_A.copy_(torch.tensor(a))
        layer.lora_B.copy_(torch.tensor(b))
    return layer


def test_orthogonality_and_l2_on_a_hand_worked_example():
    # past A rows e1, e2; current A rows (1, 2, 0), (0, 0, 3): overlap A_past A_t^T = [[1, 0], [2, 0]]
    first = _layer([[1.0, 0, 0], [0, 1.0, 0]], [[1.0, 2, 0], [0, 0, 3.0]], [[3.0, 0], [0, 4.0]])
    # a second layer whose current A is orthogonal to its past one: no overlap
    second = _layer([[0, 0, 1.0]], [[1.0, 1.0, 0]], [[0.0], [0.0]])
    assert orthogonality_loss([first, second]).item() == pytest.approx(1 + 2)  # sum of |entries| (official code)
    assert orthogonality_loss([first, second], squared=True).item() == pytest.approx(1 + 4)  # eq. 5: squared entries
    # ||A||_2 + ||B||_2 per layer: sqrt(1+4+9) + 5, then sqrt(2) + 0
    assert current_l2([first, second]).item() == pytest.approx(math.sqrt(14) + 5 + math.sqrt(2))
    assert orthogonality_loss([_layer([[1.0, 0, 0]], [[0, 1.0, 0]], [[1.0], [1.0]])]).item() == 0.0


def test_the_loss_adds_lambda_1_orthogonality_and_lambda_2_l2_to_a_new_lora_per_task(tiny_lm, distinct_tasks):
    from clpeft.strategies.o_lora import OLoRA

    first, second = InstructionIncremental(0, [{"jsonl": str(p), "max_new_tokens": 4} for p in distinct_tasks]).experiences()
    strategy = OLoRA(GenerativeLM(weights=str(tiny_lm)), orthogonal_weight=0.5, l2_weight=0.1, lora_rank=2)
    examples = second.train.load()[0][:4]
    strategy.before_experience(first)
    torch.manual_seed(0)
    layers = list(strategy.generative.lora.values())
    for layer in layers:  # the first task's LoRA, as if trained
        torch.nn.init.normal_(layer.lora_B, std=0.3)
    old_a = [layer.lora_A.detach().clone() for layer in layers]
    ids = torch.tensor([strategy.backbone.prompt_ids(examples[0].prompt)])
    before = strategy.backbone.net(ids).logits

    strategy.before_experience(second)
    assert all(layer.frozen_rank == 2 and layer.rank == 2 for layer in layers)
    assert all(torch.equal(layer.frozen_A, a) and not layer.lora_B.any() for layer, a in zip(layers, old_a))
    torch.testing.assert_close(strategy.backbone.net(ids).logits, before)  # the new LoRA starts at zero
    assert [p for n, p in strategy.named_parameters() if p.requires_grad and "lora_" in n]  # only the new one trains
    assert not any(n.endswith("frozen_A") for n, p in strategy.named_parameters())

    expected_orth = sum(float((a @ layer.lora_A.T).abs().sum()) for layer, a in zip(layers, old_a))
    expected_l2 = sum(float(layer.lora_A.norm() + layer.lora_B.norm()) for layer in layers)
    loss = strategy.training_step(Batch(examples, None)).item()
    assert expected_orth > 0
    assert loss == pytest.approx(strategy.backbone.loss(examples).item() + 0.5 * expected_orth + 0.1 * expected_l2, rel=1e-6)


def test_o_lora_runs_keeps_its_loras_apart_and_resumes_exactly(tiny_lm, distinct_tasks, tmp_path):
    tasks = [{"jsonl": str(p), "max_new_tokens": 4} for p in distinct_tasks]
    overlap = {}
    for weight in (0.0, 0.5):
        engine = Engine(_config(tasks, tiny_lm, name="o_lora", orthogonal_weight=weight), tmp_path / f"run{weight}", device="cpu")
        result = engine.run()
        R = np.asarray(result["acc_matrix"])
        assert R[0, 0] == 1.0 and R[1, 1] >= 0.8
        layers = list(engine.built.strategy.generative.lora.values())
        overlap[weight] = sum(float((layer.frozen_A @ layer.lora_A.T).abs().sum()) for layer in layers)
    assert overlap[0.5] < 0.5 * overlap[0.0], overlap  # lambda_1 pushes the new A away from the old one

    for lost in (tmp_path / "run0.5" / "checkpoints").glob("exp_001.pt*"):  # killed during the second task
        lost.unlink()
    (tmp_path / "run0.5" / "metrics.json").unlink()
    resumed = Engine(_config(tasks, tiny_lm, name="o_lora", orthogonal_weight=0.5), tmp_path / "run0.5", device="cpu", resume=True)
    assert resumed.run()["acc_matrix"] == result["acc_matrix"]
