"""Instruction data: (prompt, target) pairs with the metric that scores a generated answer.

An instruction-incremental scenario (:mod:`clpeft.scenarios.instruction_incremental`) holds
each task's examples in an :class:`InstructionDataset`; batches come out as lists of
:class:`Instruction` records, which a generative strategy trains on (loss on the target's
tokens) and scores (:mod:`clpeft.text_metrics` on its generated text). Every label is 0: the
answer is the text itself, so all tasks share one label space and FWT stays measurable.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class Instruction:
    """One example of a task.

    Attributes:
        prompt: what the model is asked: the user turn the answer replies to (formatted with the
            tokenizer's chat template, if any).
        target: the reference answer; training puts the loss on its tokens only.
        metric: ``exact_match``, ``label_words`` or ``rouge_l`` (:data:`clpeft.text_metrics.METRICS`).
        choices: the label words of a ``label_words`` task (empty otherwise).
        max_new_tokens: the most tokens generated for an answer.
        stop: strings that end an answer (the text from the first one on is cut).
        context: the chat before the prompt's user turn, ``(role, content)`` pairs (``system``,
            ``user``, ``assistant``) of an example given as chat messages; empty for a plain pair.
    """

    prompt: str
    target: str
    metric: str = "exact_match"
    choices: tuple[str, ...] = ()
    max_new_tokens: int = 16
    stop: tuple[str, ...] = ("\n",)
    context: tuple[tuple[str, str], ...] = ()


class InstructionDataset(torch.utils.data.Dataset):
    """A task's examples in memory; ``gather`` gives a list of :class:`Instruction` and zero labels.

    Args:
        examples: the task's examples.
        name: identity in logs and in the fingerprint (``"add/train"``).
    """

    def __init__(self, examples: Sequence[Instruction], name: str):
        self.inputs = np.empty(len(examples), dtype=object)
        self.inputs[:] = list(examples)
        self.targets = torch.zeros(len(examples), dtype=torch.long)
        self.name = name
        self.class_names = ["text"]
        self._fingerprint: str | None = None

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int) -> tuple[Instruction, torch.Tensor]:
        return self.inputs[i], self.targets[i]

    def gather(self, indices) -> tuple[list[Instruction], torch.Tensor]:
        idx = torch.as_tensor(indices, dtype=torch.long)
        return self.inputs[idx.numpy()].tolist(), self.targets[idx]

    @property
    def fingerprint(self) -> str:
        """A digest of the name and every example's fields."""
        if self._fingerprint is None:
            h = hashlib.sha1(self.name.encode())
            for example in self.inputs:
                h.update(repr(example).encode("utf-8"))
            self._fingerprint = h.hexdigest()[:16]
        return self._fingerprint
