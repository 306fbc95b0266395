"""``benchmarks/llm_bench.py`` still runs: clpeft's LoRA step and batched greedy decoding against
transformers + peft, on the tiny random Llama.

Training (2 steps of batch 2 from the same LoRA start, memory probed in fresh subprocesses): both
loops see the same tokens, give the same losses and end at the same LoRA factors, which did move;
the agreement rule catches a factor moved by 1 %. Generation (2 prompts x 4 new tokens): the
batched answers equal the per-sample ``generate`` loop's. Both Markdown tables have a row per side.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "llm_bench.py"


@pytest.fixture(scope="module")
def bench():
    pytest.importorskip("peft")
    spec = importlib.util.spec_from_file_location("llm_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules[spec.name]


def test_training_step_agrees_with_peft_and_fills_the_table(bench, tiny_lm):
    result = bench.measure_training(str(tiny_lm), batch=2, steps=2, warmup=0, memory_steps=1)
    assert result["same_tokens"]
    assert len(result["losses"]["clpeft"]) == len(result["losses"]["plain"]) == 2
    assert result["loss_diff"] < bench.TOLERANCE and result["factor_diff"] < bench.TOLERANCE
    assert result["factors_moved"] > 1e-3 and result["agree"]
    assert all(result["wall"][s] > 0 and result["cpu"][s] > 0 for s in bench.SIDES)
    assert all(m["model_mib"] > 0 and m["step_peak_mib"] >= 0 for m in result["memory"].values())
    table = bench.training_table(result, "tiny").splitlines()
    assert sum(line.startswith(("| clpeft seq_finetune |", "| transformers + peft |")) for line in table) == 2
    assert any("AGREE" in line and "DISAGREE" not in line for line in table)


def test_agreement_rule_catches_a_moved_factor(bench):
    factors = {"q.A": torch.randn(8, 32), "q.B": torch.randn(32, 8)}
    moved = {**factors, "q.B": factors["q.B"] * 1.01}
    assert bench.relative_difference(factors, factors) == 0
    assert bench.relative_difference(moved, factors) > bench.TOLERANCE


def test_batched_generation_equals_the_per_sample_loop(bench, tiny_lm):
    result = bench.measure_generation(str(tiny_lm), prompts=2, new_tokens=4, repeats=1, warmup=0)
    assert result["identical"] == 2 and result["agree"]
    assert all(len(a) > 0 for a in result["answers"]["clpeft"])
    table = bench.generation_table(result, "tiny").splitlines()
    assert sum(line.startswith(("| clpeft batched, KV cache |", "| per-sample model.generate |")) for line in table) == 2
