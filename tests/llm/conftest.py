"""Fixtures: a tiny random Llama (:mod:`tiny_llama`), with and without a chat template, and JSONL tasks
a model that small learns in a few epochs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tiny_llama import save_tiny_llama

#: A chat template in the style of SmolLM2's (ChatML), for the template path.
CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"
)


@pytest.fixture(scope="session")
def tiny_lm(tmp_path_factory) -> Path:
    """A tiny random Llama without a chat template (prompts end with a newline)."""
    return save_tiny_llama(tmp_path_factory.mktemp("tiny_llama"))


@pytest.fixture(scope="session")
def tiny_chat_lm(tmp_path_factory) -> Path:
    """The same model with a chat template."""
    return save_tiny_llama(tmp_path_factory.mktemp("tiny_chat_llama"), chat_template=CHAT_TEMPLATE)


def _write_task(path: Path, target: str, n: int = 48, seed: int = 0, prefix: str = "q") -> Path:
    """``n`` prompts ``<prefix> <4 letters>`` all answered ``target``: trivially learnable, and two tasks with
    different targets for the same kind of prompt interfere (training the second forgets the first)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    with path.open("w") as f:
        for _ in range(n):
            f.write(json.dumps({"prompt": f"{prefix} " + "".join(rng.choice(list("abcdefgh"), 4)), "target": target}) + "\n")
    return path


@pytest.fixture
def two_tasks(tmp_path) -> list[Path]:
    """Two JSONL tasks of ``q <letters>`` prompts: the first answered ``ab``, the second ``ba``."""
    return [_write_task(tmp_path / "first.jsonl", "ab", seed=0), _write_task(tmp_path / "second.jsonl", "ba", seed=1)]


@pytest.fixture
def distinct_tasks(tmp_path) -> list[Path]:
    """Two JSONL tasks told apart by their prompts' first letter: ``q <letters>`` -> ``ab``, then
    ``r <letters>`` -> ``ba``. One model can answer both; plain fine-tuning on the second forgets the first."""
    tasks = []
    for prefix, target, seed in (("q", "ab", 0), ("r", "ba", 1)):  # train.jsonl and test.jsonl: no split drawn from the path
        (tmp_path / prefix).mkdir()
        _write_task(tmp_path / prefix / "train.jsonl", target, n=38, seed=seed, prefix=prefix)
        tasks.append(_write_task(tmp_path / prefix / "test.jsonl", target, n=10, seed=seed + 10, prefix=prefix))
    return [t.parent for t in tasks]
