"""Scores of a generated answer against its reference, each in [0, 1].

* ``exact_match``: 1 when the answer equals the target after stripping the ends and collapsing
  inner whitespace (case kept: reversing "Ab" is "bA", not "ba").
* ``label_words``: accuracy through label words, as the generative classification tasks of
  O-LoRA (Wang et al., EMNLP 2023 Findings, https://arxiv.org/abs/2310.14152) are scored: the
  predicted label is the label word the answer starts with (case-insensitive, the longest
  such word when several match); 1 when it is the target's.
* ``rouge_l``: ROUGE-L F-measure (Lin, "ROUGE: A Package for Automatic Evaluation of
  Summaries", ACL 2004 workshop, Sec. 3.1): with ``LCS`` the longest common subsequence of the
  reference's and the answer's tokens, ``R = LCS / |ref|``, ``P = LCS / |answer|`` and
  ``F = (1 + b^2) R P / (R + b^2 P)`` with ``b = 1``, as Google's ``rouge_score`` computes it.
  Tokens are lowercase runs of ``[a-z0-9]`` (``rouge_score``'s tokenizer without stemming).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

__all__ = ["METRICS", "exact_match", "label_word", "lcs_length", "rouge_l", "score"]

_TOKEN = re.compile(r"[a-z0-9]+")


def _normalize(text: str) -> str:
    return " ".join(text.split())


def exact_match(prediction: str, target: str) -> float:
    return float(_normalize(prediction) == _normalize(target))


def label_word(prediction: str, choices: Sequence[str]) -> str | None:
    """The label word ``prediction`` starts with (case-insensitive; the longest match), or None."""
    answer = _normalize(prediction).casefold()
    matches = [c for c in choices if answer.startswith(_normalize(c).casefold())]
    return max(matches, key=len) if matches else None


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence (dynamic programming, one row at a time)."""
    row = [0] * (len(b) + 1)
    for x in a:
        previous_diagonal = 0
        for j, y in enumerate(b, start=1):
            previous_diagonal, row[j] = row[j], previous_diagonal + 1 if x == y else max(row[j], row[j - 1])
    return row[-1]


def rouge_l(prediction: str, target: str) -> float:
    """ROUGE-L F1 of ``prediction`` against the reference ``target`` (see the module docstring)."""
    answer, reference = _TOKEN.findall(prediction.lower()), _TOKEN.findall(target.lower())
    common = lcs_length(reference, answer)
    if common == 0:
        return 0.0
    recall, precision = common / len(reference), common / len(answer)
    return 2 * precision * recall / (precision + recall)


def _label_words(prediction: str, target: str, choices: Sequence[str]) -> float:
    predicted = label_word(prediction, choices)
    return float(predicted is not None and predicted.casefold() == target.strip().casefold())


METRICS: dict[str, Callable[[str, str, Sequence[str]], float]] = {
    "exact_match": lambda prediction, target, _choices: exact_match(prediction, target),
    "label_words": _label_words,
    "rouge_l": lambda prediction, target, _choices: rouge_l(prediction, target),
}


def score(metric: str, prediction: str, target: str, choices: Sequence[str] = ()) -> float:
    """``metric`` (a key of :data:`METRICS`) of one answer."""
    return METRICS[metric](prediction, target, choices)
