"""Perplexity retention: the general text's perplexity against transformers' own loss, measured on the
pretrained model before the stream and on the trained one after it."""

import json
import math

import pytest
import torch
from test_seq_finetune import _config
from transformers import AutoModelForCausalLM

from clpeft.backbones.generative_lm import GenerativeLM
from clpeft.components.generative.perplexity_retention import general_texts
from clpeft.engine import Engine


def _reference_perplexity(net, tokenizer, texts, max_length) -> float:
    """One text at a time, no padding: transformers' mean loss times the predicted tokens."""
    total, count = 0.0, 0
    for text in texts:
        ids = torch.tensor([tokenizer(text)["input_ids"][:max_length]])
        with torch.no_grad():
            total += net(input_ids=ids, labels=ids).loss.item() * (ids.shape[1] - 1)
        count += ids.shape[1] - 1
    return math.exp(total / count)


def test_perplexity_equals_transformers_loss_one_text_at_a_time(tiny_lm):
    backbone = GenerativeLM(weights=str(tiny_lm), max_length=64)
    texts = general_texts(5)
    assert len(set(texts)) == 5 and all(len(t) > 20 for t in texts)
    assert general_texts(5) == texts  # a seeded draw
    reference = _reference_perplexity(AutoModelForCausalLM.from_pretrained(tiny_lm), backbone.tokenizer, texts, 64)
    assert backbone.perplexity(texts, batch_size=2) == pytest.approx(reference, rel=1e-5)  # padded batches change nothing


def test_final_metrics_hold_the_perplexity_before_and_after_the_stream(tiny_lm, distinct_tasks, tmp_path):
    tasks = [{"jsonl": str(p), "max_new_tokens": 4} for p in distinct_tasks]
    engine = Engine(_config(tasks, tiny_lm, epochs=2, general_text_samples=8), tmp_path / "run", device="cpu")
    written = engine.run()["metrics"]
    strategy = engine.built.strategy
    metrics = strategy.final_metrics()
    for key in ("perplexity_before", "perplexity_after", "perplexity_ratio"):  # the engine puts them into metrics.json
        assert written[key] == pytest.approx(metrics[key], rel=1e-6)
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["metrics"]["perplexity_ratio"] == written["perplexity_ratio"]
    texts = general_texts(8)
    pretrained = GenerativeLM(weights=str(tiny_lm))
    assert metrics["perplexity_before"] == pytest.approx(pretrained.perplexity(texts), rel=1e-6)
    assert metrics["perplexity_after"] == pytest.approx(strategy.backbone.perplexity(texts), rel=1e-6)
    assert metrics["perplexity_after"] != pytest.approx(metrics["perplexity_before"], rel=1e-3)  # training moved it
    assert metrics["perplexity_ratio"] == pytest.approx(metrics["perplexity_after"] / metrics["perplexity_before"])
