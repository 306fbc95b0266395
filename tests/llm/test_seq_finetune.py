"""seq_finetune on a tiny random Llama through the real engine: the matrix is each task's mean score,
the first task is learnt and then forgotten, resume repeats the matrix; the offline SmolLM2 config (slow)."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import clpeft.config
from clpeft.data import Batch
from clpeft.engine import Engine
from clpeft.instructions import Instruction

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"]


def _config(tasks, weights, epochs=8, name="seq_finetune", **strategy):
    return clpeft.config.resolve(
        {
            "seed": 0,
            "scenario": {"name": "instruction_incremental", "tasks": tasks},
            "backbone": {"name": "generative_lm", "weights": str(weights)},
            "strategy": {"name": name, "lora_targets": TARGETS, "lora_rank": 4, **strategy},
            "train": {"epochs": epochs, "batch_size": 8, "lr": 0.01, "optimizer": "adam"},
            "eval": {"batch_size": 32, "baseline": True},
            "logging": {"tensorboard": False, "progress": "never"},
        }
    )


def test_two_tasks_fill_the_matrix_learn_forget_and_resume(tiny_lm, two_tasks, tmp_path):
    cfg = _config([{"jsonl": str(p), "max_new_tokens": 4} for p in two_tasks], tiny_lm)
    engine = Engine(cfg, tmp_path / "run", device="cpu")
    result = engine.run()
    R, baseline = np.asarray(result["acc_matrix"]), result["baseline"]
    strategy = engine.built.strategy
    tests = [exp.test.load()[0] for exp in engine.built.stream]
    answers = [strategy.backbone.generate([e.prompt for e in examples], 4, ["\n"]) for examples in tests]
    # what to look at when the rows below are wrong (row 2 was [0, 0] for about 1 in 16 splits of the tasks while
    # the split was keyed by the file's temporary path, so it changed from run to run; keyed by its name now)
    events = (tmp_path / "run" / "events.jsonl").read_text().splitlines()
    losses = [round(e["loss"], 4) for e in map(json.loads, events) if e["event"] == "train_epoch"]
    context = f"R = {R.tolist()}, first answers per task {[a[:3] for a in answers]}, epoch losses {losses}"
    assert R.shape == (2, 2) and baseline == [0.0, 0.0], context  # the random model answers neither task
    assert R[0, 0] == 1.0 and R[1, 1] >= 0.5, context  # each task is learnt ...
    assert R[1, 0] <= 0.2  # ... and plain fine-tuning on "ba" forgets "ab"
    metrics = result["metrics"]
    assert metrics["forgetting"] == pytest.approx(R[0, 0] - R[1, 0]) and metrics["bwt"] == pytest.approx(R[1, 0] - R[0, 0])
    assert metrics["fwt"] == pytest.approx(R[0, 1] - baseline[1])
    assert "final_confusion" not in result  # no classes are predicted

    # the last row is the exact-match rate of the trained model's greedy answers, recomputed here
    for j, examples in enumerate(tests):
        assert np.mean([a == e.target for a, e in zip(answers[j], examples)]) == pytest.approx(R[1, j])

    for lost in (tmp_path / "run" / "checkpoints").glob("exp_001.pt*"):  # killed during the second task
        lost.unlink()
    (tmp_path / "run" / "metrics.json").unlink()
    assert Engine(cfg, tmp_path / "run", device="cpu", resume=True).run()["acc_matrix"] == result["acc_matrix"]


def test_score_applies_each_examples_metric(tiny_lm, monkeypatch):
    from clpeft.backbones.generative_lm import GenerativeLM
    from clpeft.strategies.seq_finetune import SeqFinetune

    strategy = SeqFinetune(GenerativeLM(weights=str(tiny_lm)), lora_targets=["q_proj"], lora_rank=2)
    examples = [
        Instruction("a", "85", "exact_match"),
        Instruction("b", "the cat sat", "rouge_l"),
        Instruction("c", "negative", "label_words", ("positive", "negative")),
    ]
    calls = []

    def generate(prompts, max_new_tokens, stop):
        calls.append((prompts, max_new_tokens, stop))
        return [" 85", "cat the", "Negative."]

    monkeypatch.setattr(strategy.backbone, "generate", generate)
    scores = strategy.score(Batch(examples, torch.zeros(3, dtype=torch.long)))
    assert scores.tolist() == pytest.approx([1.0, 0.4, 1.0])
    assert calls == [(examples, 16, ["\n"])]  # the examples themselves: a chat example's context reaches generation


@pytest.mark.slow
def test_the_offline_smollm2_config_learns_its_first_task(tmp_path):
    config = Path(__file__).resolve().parents[2] / "configs" / "llm" / "offline_smollm2_seq_finetune.yaml"
    cache = Path.home() / ".cache" / "clpeft" / "weights"  # the converted GGUF, shared with the user's runs
    cfg = clpeft.config.load(
        config,
        [
            "scenario.tasks=[{task: date_format, train: 16, test: 8, max_new_tokens: 12}, "
            "{task: add, train: 16, test: 8, max_new_tokens: 6}]",
            f"backbone.cache_dir={cache}",
            "logging.tensorboard=false",
            "logging.progress=never",
        ],
    )
    result = Engine(cfg, tmp_path / "run", device="cpu").run()
    R = np.asarray(result["acc_matrix"])
    assert R.shape == (2, 2) and result["baseline"][0] == 0.0  # ISO dates zero-shot: no exact match
    assert R[0, 0] > 0 and R[1, 1] > result["baseline"][1], (R, result["baseline"])  # four steps each teach something


def test_the_trained_lora_loads_in_peft_on_the_plain_model(tiny_lm, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from clpeft.backbones.generative_lm import GenerativeLM
    from clpeft.components.lora import save_peft_adapter
    from clpeft.strategies.seq_finetune import SeqFinetune

    strategy = SeqFinetune(GenerativeLM(weights=str(tiny_lm)), lora_targets=TARGETS, lora_rank=4).eval()
    torch.manual_seed(0)
    for layer in strategy.generative.lora.values():  # as if trained: B no longer zero
        torch.nn.init.normal_(layer.lora_B, std=0.5)
    save_peft_adapter(strategy.backbone.net, tmp_path / "adapter")
    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_lm), tmp_path / "adapter").eval()
    ids = torch.tensor([strategy.backbone.prompt_ids("q abcd")])
    with torch.no_grad():
        ours, theirs = strategy.backbone.net(ids).logits, peft_model(input_ids=ids).logits
        plain = AutoModelForCausalLM.from_pretrained(tiny_lm)(ids).logits
    assert not torch.allclose(ours, plain, atol=1e-3)  # the adapter changes the outputs ...
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)  # ... and peft applies the same change
