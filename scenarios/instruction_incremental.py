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
  ``train.jsonl`` and ``test.jsonl``, or one ``.jsonl`` file split with ``test_fraction`` (drawn
  from the run seed and the file's name, so the same wherever the file lives). Every
  line is a JSON object ``{"prompt": "...", "target": "..."}`` (other keys are ignored), or chat
  messages in the OpenAI/Hugging Face format, ``{"messages": [{"role": "system"|"user"|"assistant",
  "content": "..."}, ...]}``: the last message is the assistant's answer (the target), the user
  message before it the prompt, and the earlier ones its context, all rendered by the backbone's
  chat template. Blank lines are skipped. A ``label_words`` task lists its words in ``choices``.
  Relative paths are read from ``root`` (default: the working directory); a run whose files are
  missing stops before training with one line naming them.

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


ROLES = ("system", "user", "assistant")
_FORMAT = 'each line is one {"prompt": "...", "target": "..."} or {"messages": [{"role": ..., "content": ...}, ...]} object'

#: One line's example: ``(prompt, target, context)``, context being the chat before the prompt's user turn.
Row = tuple[str, str, tuple[tuple[str, str], ...]]


def _chat_row(messages, where: str) -> Row:
    """The example of a ``messages`` line: the last (assistant) message is the target, the one
    before it (a user message) the prompt, and the earlier ones its context."""
    if not isinstance(messages, list) or not messages:
        raise UserError(f"{where}: 'messages' must be a non-empty list; {_FORMAT}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            role = m.get("role") if isinstance(m, dict) else m
            raise UserError(f"{where}: message {i} has role {role!r}; roles are {', '.join(ROLES)}")
        if not isinstance(m.get("content"), str) or not m["content"].strip():
            raise UserError(f"{where}: message {i} ({m['role']}) has no content; give every message a non-empty string 'content'")
    if messages[-1]["role"] != "assistant":
        raise UserError(f"{where}: the last message is {messages[-1]['role']!r}; it must be the assistant's answer (the target)")
    if len(messages) < 2 or messages[-2]["role"] != "user":
        raise UserError(
            f"{where}: the answer must follow a user message (the prompt); put the user's question before the last assistant message"
        )
    return messages[-2]["content"], messages[-1]["content"], tuple((m["role"], m["content"]) for m in messages[:-2])


def read_jsonl(path: Path) -> list[Row]:
    """``(prompt, target, context)`` of every non-blank line; a bad line is a one-line error naming file and line."""
    if not path.is_file():
        raise UserError(f"{path} does not exist; give a .jsonl file or a folder with train.jsonl and test.jsonl", key="scenario.tasks")
    rows = []
    with path.open(encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise UserError(f"{path}:{number}: not valid JSON ({err.msg}); {_FORMAT}") from None
            if isinstance(row, dict) and "messages" in row:
                rows.append(_chat_row(row["messages"], f"{path}:{number}"))
                continue
            bad = [k for k in ("prompt", "target") if not isinstance(row, dict) or not isinstance(row.get(k), str)]
            if bad:
                raise UserError(f"{path}:{number}: needs string fields {' and '.join(repr(k) for k in bad)}; {_FORMAT}")
            rows.append((row["prompt"], row["target"], ()))
    if not rows:
        raise UserError(f"{path} holds no examples", key="scenario.tasks")
    return rows


def _jsonl_splits(path: Path, task: Task, seed: int) -> tuple[list[Row], list[Row]]:
    if path.is_dir():
        return read_jsonl(path / "train.jsonl"), read_jsonl(path / "test.jsonl")
    rows = read_jsonl(path)
    if len(rows) < 2:
        raise UserError(f"{path} has one example; a single file is split into train and test", key="scenario.tasks")
    # keyed by the file's name, not its path: the same file split alike wherever it lives and however it is written
    train, test = split_positions(len(rows), task.test_fraction, seed, path.name)
    return [rows[i] for i in train], [rows[i] for i in test]


@register_scenario("instruction_incremental")
class InstructionIncremental(Scenario):
    """A stream of generative tasks, one per experience (continual instruction tuning).

    Args:
        seed: run seed (generated tasks and JSONL splits draw from it).
        tasks: one entry per experience, a built-in ``task`` or a ``jsonl`` source (see the module docs).
        root: the folder relative ``jsonl`` paths are read from (default: the working directory).
    """

    kind = "instruction_incremental"

    def __init__(self, seed: int, tasks: list[Task], root: str | None = None):
        self.seed = seed
        self.root = Path(root).expanduser() if root is not None else None
        self.tasks = [Task.model_validate(t) for t in tasks]
        if not self.tasks:
            raise UserError("expected at least one task", key="scenario.tasks")
        names = [t.label() for t in self.tasks]
        if len(set(names)) != len(names):
            raise UserError(f"task names repeat ({names}); give repeated tasks a 'name' each", key="scenario.tasks")
        self.input_shape = ()
        self.class_names = ["text"]

    def experiences(self) -> list[Experience]:
        self._check_data()
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

    def _path(self, task: Task) -> Path:
        path = Path(task.jsonl).expanduser()
        return self.root / path if self.root is not None else path

    def _check_data(self) -> None:
        """Every JSONL source is there, or one line says which are missing and where they go."""
        missing = []
        for task in self.tasks:
            if task.jsonl is None:
                continue
            path = self._path(task)
            lacking = [path / f for f in ("train.jsonl", "test.jsonl") if not (path / f).is_file()] if path.is_dir() else [path]
            missing += [p for p in lacking if not p.is_file()]
        if missing:
            where = f" under {self.root.absolute()}" if self.root is not None else ""
            names = [str(p.relative_to(self.root)) if self.root is not None and p.is_relative_to(self.root) else str(p) for p in missing]
            raise UserError(
                f"missing data{where}: {', '.join(names)} (each task: a folder with train.jsonl and test.jsonl, or one .jsonl "
                f"file); put it there, or set scenario.root to the folder that holds it (a benchmark config's comments say how to make it)",
                key="scenario.root",
            )

    def _examples(self, task: Task) -> tuple[list[Instruction], list[Instruction]]:
        if task.task is not None:
            n_train, n_test = task.train or 200, task.test or 50
            examples = builtin_task(task.task, n_train + n_test, self.seed, task.max_new_tokens)
            return examples[:n_train], examples[n_train:]
        splits = _jsonl_splits(self._path(task), task, self.seed)
        metric, choices = task.metric or "exact_match", tuple(task.choices)
        train, test = ([Instruction(p, t, metric, choices, task.max_new_tokens, context=c) for p, t, c in rows] for rows in splits)
        rng = np.random.default_rng(self.seed)
        if task.train is not None and task.train < len(train):
            train = [train[i] for i in sorted(rng.choice(len(train), task.train, replace=False))]
        if task.test is not None and task.test < len(test):
            test = [test[i] for i in sorted(rng.choice(len(test), task.test, replace=False))]
        return train, test
