"""Instruction-incremental streams: one generative task per experience, for continual instruction tuning.

The setting of continual instruction tuning of decoder LLMs (O-LoRA, Wang et al., EMNLP 2023
Findings, https://arxiv.org/abs/2310.14152; TRACE, Wang et al. 2023,
https://arxiv.org/abs/2310.06762): a model is fine-tuned on task after task of (prompt, target)
pairs and, after each, answers every task's test prompts; each answer is scored by its task's
metric (:mod:`clpeft.text_metrics`: exact match, accuracy through label words, ROUGE-L), and
the mean score fills the accuracy matrix, so ``acc_last``, BWT, forgetting and FWT mean what
they mean everywhere in clpeft (FWT against the untrained model's zero-shot answers).

Each entry of ``tasks`` is one experience, either

* ``{task: add, train: 200, test: 50}``: a built-in task (:mod:`clpeft.scenarios.instruction_tasks`:
  ``add``, ``reverse``, ``sort``, ``count``, ``date_format``, ``caesar`` generated from the run
  seed, and ``rotten_tomatoes`` sentiment as label words), or
* ``{jsonl: path, metric: rouge_l}``: your own data. ``path`` is a folder holding
  ``train.jsonl`` and ``test.jsonl``, or one ``.jsonl`` file split with ``test_fraction``. Every
  line is a JSON object ``{"prompt": "...", "target": "..."}`` (other keys are ignored); blank
  lines are skipped. A ``label_words`` task lists its words in ``choices``.

The strategy sees batches of :class:`~clpeft.instructions.Instruction` records (labels are all
0: the answer is the text) and must score them itself (a generative strategy's ``score``).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from clpeft.data import DataView
from clpeft.errors import UserError
from clpeft.experience import Experience, Scenario
from clpeft.instructions import Instruction, InstructionDataset
from clpeft.registry import register_scenario
from clpeft.scenarios.instruction_tasks import BUILTIN_TASKS, builtin_task
from clpeft.scenarios.text_datasets import split_positions


class Task(BaseModel):
    """One experience: a built-in task or a JSONL source (exactly one)."""

    model_config = ConfigDict(extra="forbid")

    task: str | None = Field(None, description=f"a built-in task: {', '.join(BUILTIN_TASKS)}")
    jsonl: str | None = Field(None, description="a folder with train.jsonl and test.jsonl, or one .jsonl file")
    name: str | None = Field(None, description="name in logs (default: the task, or the JSONL path's stem)")
    train: Annotated[int, Field(ge=1)] | None = Field(None, description="training examples (built-in: 200; JSONL: all)")
    test: Annotated[int, Field(ge=1)] | None = Field(None, description="test examples (built-in: 50; JSONL: all)")
    metric: Literal["exact_match", "label_words", "rouge_l"] | None = Field(
        None, description="how answers are scored (built-in tasks have their own; JSONL default: exact_match)"
    )
    choices: list[str] = Field(default_factory=list, description="the label words of a label_words JSONL task")
    test_fraction: Annotated[float, Field(gt=0, lt=1)] = Field(0.2, description="test share when jsonl is one file")
    max_new_tokens: Annotated[int, Field(ge=1)] = Field(16, description="the most tokens generated per answer")

    @model_validator(mode="after")
    def _one_source(self) -> Task:
        if (self.task is None) == (self.jsonl is None):
            raise ValueError("a task is either a built-in 'task' or a 'jsonl' source, exactly one")
        if self.task is not None and (self.metric is not None or self.choices):
            raise ValueError(f"built-in task '{self.task}' has its own metric; drop metric and choices")
        if (self.metric == "label_words") != bool(self.choices):
            raise ValueError("a label_words task needs choices (its label words), and only such a task takes them")
        return self

    def label(self) -> str:
        return self.name or self.task or Path(self.jsonl).stem


def read_jsonl(path: Path) -> list[tuple[str, str]]:
    """``(prompt, target)`` of every non-blank line; a bad line is a one-line error naming file and line."""
    if not path.is_file():
        raise UserError(f"{path} does not exist; give a .jsonl file or a folder with train.jsonl and test.jsonl", key="scenario.tasks")
    pairs = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise UserError(
                    f'{path}:{number}: not valid JSON ({err.msg}); each line is one {{"prompt": "...", "target": "..."}} object'
                ) from None
            bad = [k for k in ("prompt", "target") if not isinstance(row, dict) or not isinstance(row.get(k), str)]
            if bad:
                raise UserError(
                    f"{path}:{number}: needs string fields {' and '.join(repr(k) for k in bad)}; each line is "
                    'one {"prompt": "...", "target": "..."} object'
                )
            pairs.append((row["prompt"], row["target"]))
    if not pairs:
        raise UserError(f"{path} holds no examples", key="scenario.tasks")
    return pairs


def _jsonl_splits(task: Task, seed: int) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    path = Path(task.jsonl).expanduser()
    if path.is_dir():
        return read_jsonl(path / "train.jsonl"), read_jsonl(path / "test.jsonl")
    pairs = read_jsonl(path)
    if len(pairs) < 2:
        raise UserError(f"{path} has one example; a single file is split into train and test", key="scenario.tasks")
    train, test = split_positions(len(pairs), task.test_fraction, seed, str(path))
    return [pairs[i] for i in train], [pairs[i] for i in test]


@register_scenario("instruction_incremental")
class InstructionIncremental(Scenario):
    """A stream of generative tasks, one per experience (continual instruction tuning).

    Args:
        seed: run seed (generated tasks and JSONL splits draw from it).
        tasks: one entry per experience, a built-in ``task`` or a ``jsonl`` source (see the module docs).
    """

    kind = "instruction_incremental"

    def __init__(self, seed: int, tasks: list[Task]):
        self.seed = seed
        self.tasks = [Task.model_validate(t) for t in tasks]
        if not self.tasks:
            raise UserError("expected at least one task", key="scenario.tasks")
        names = [t.label() for t in self.tasks]
        if len(set(names)) != len(names):
            raise UserError(f"task names repeat ({names}); give repeated tasks a 'name' each", key="scenario.tasks")
        self.input_shape = ()
        self.class_names = ["text"]

    def experiences(self) -> list[Experience]:
        stream = []
        for i, task in enumerate(self.tasks):
            train, test = self._examples(task)
            views = [DataView.of(InstructionDataset(part, f"{task.label()}/{split}")) for part, split in ((train, "train"), (test, "test"))]
            stream.append(
                Experience(
                    index=i,
                    train=views[0],
                    test=views[1],
                    classes_in_this_experience=[0],
                    classes_seen_so_far=[0],
                    task_label=i,
                    domain=task.label(),
                )
            )
        return self.link(stream)

    def _examples(self, task: Task) -> tuple[list[Instruction], list[Instruction]]:
        if task.task is not None:
            n_train, n_test = task.train or 200, task.test or 50
            examples = builtin_task(task.task, n_train + n_test, self.seed, task.max_new_tokens)
            return examples[:n_train], examples[n_train:]
        splits = _jsonl_splits(task, self.seed)
        metric, choices = task.metric or "exact_match", tuple(task.choices)
        train, test = ([Instruction(p, t, metric, choices, task.max_new_tokens) for p, t in pairs] for pairs in splits)
        rng = np.random.default_rng(self.seed)
        if task.train is not None and task.train < len(train):
            train = [train[i] for i in sorted(rng.choice(len(train), task.train, replace=False))]
        if task.test is not None and task.test < len(test):
            test = [test[i] for i in sorted(rng.choice(len(test), task.test, replace=False))]
        return train, test
