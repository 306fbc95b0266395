"""The instruction_incremental scenario: built-in tasks, JSONL sources and their errors."""

import json
import re

import pytest

import clpeft.config
from clpeft.errors import UserError
from clpeft.scenarios.instruction_incremental import InstructionIncremental
from clpeft.scenarios.instruction_tasks import GENERATORS


def _examples(tasks, seed=0):
    stream = InstructionIncremental(seed, tasks).experiences()
    return stream, [(e.train.load()[0], e.test.load()[0]) for e in stream]


def _solve(prompt: str) -> str:
    """Each generated task's answer, computed from its prompt independently of the generators."""
    task, _, arg = prompt.partition(": ")
    if task == "Add":
        return str(sum(int(v) for v in arg.split("+")))
    if task == "Reverse":
        return "".join(reversed(arg))
    if task == "Sort":
        return " ".join(sorted(arg.split(), key=int))
    if task == "Count the letter a in":
        return str(sum(c == "a" for c in arg))
    if task == "Shift letters by 1":
        return "".join(chr((ord(c) - 97 + 1) % 26 + 97) for c in arg)
    y, m, d = re.fullmatch(r"Date (\d{4})-(\d\d)-(\d\d) as DD/MM/YYYY", prompt).groups()
    return f"{d}/{m}/{y}"


def test_generated_tasks_are_correct_seeded_and_split_without_shared_prompts():
    tasks = [{"task": name, "train": 30, "test": 10} for name in GENERATORS]
    stream, data = _examples(tasks)
    assert [e.domain for e in stream] == list(GENERATORS)
    for exp, (train, test) in zip(stream, data):
        assert (len(train), len(test)) == (30, 10)
        assert exp.classes_in_this_experience == exp.classes_seen_so_far == [0] and exp.task_label == exp.index
        assert not {e.prompt for e in train} & {e.prompt for e in test}
        for example in train + test:
            assert example.target == _solve(example.prompt), example
            assert example.metric == "exact_match"
    again = _examples(tasks)[1]
    other = _examples(tasks, seed=1)[1]
    assert again == data and other != data


def test_rotten_tomatoes_is_sentiment_as_label_words():
    (exp,), ((train, test),) = _examples([{"task": "rotten_tomatoes", "train": 40, "test": 11, "max_new_tokens": 3}])
    targets = [e.target for e in train + test]
    assert abs(targets.count("positive") - targets.count("negative")) <= 1
    assert all(e.metric == "label_words" and e.choices == ("positive", "negative") and e.max_new_tokens == 3 for e in train + test)
    assert all(e.prompt.startswith("Review: ") and e.prompt.endswith("positive or negative?") for e in train)


def test_jsonl_folder_and_single_file(tmp_path):
    folder = tmp_path / "qa"
    folder.mkdir()
    for split, n in (("train", 5), ("test", 3)):
        rows = [json.dumps({"prompt": f"{split} {i}", "target": str(i), "extra": 1}) for i in range(n)]
        (folder / f"{split}.jsonl").write_text("\n".join(rows) + "\n\n")
    single = tmp_path / "summaries.jsonl"
    single.write_text("".join(json.dumps({"prompt": f"p{i}", "target": f"t {i}"}) + "\n" for i in range(10)))
    stream, data = _examples(
        [{"jsonl": str(folder), "train": 4}, {"jsonl": str(single), "metric": "rouge_l", "test_fraction": 0.3, "max_new_tokens": 32}]
    )
    (train, test), (train2, test2) = data
    assert [e.domain for e in stream] == ["qa", "summaries"]
    assert len(train) == 4 and {e.prompt for e in train} < {f"train {i}" for i in range(5)}
    assert [(e.prompt, e.target) for e in test] == [(f"test {i}", str(i)) for i in range(3)]
    assert (len(train2), len(test2)) == (7, 3) and not {e.prompt for e in train2} & {e.prompt for e in test2}
    assert all(e.metric == "rouge_l" and e.max_new_tokens == 32 for e in train2 + test2)


def test_a_single_files_split_depends_on_the_seed_and_its_name_not_on_where_it_lives(tmp_path, monkeypatch):
    lines = "".join(json.dumps({"prompt": f"p{i}", "target": f"t{i}"}) + "\n" for i in range(40))
    for folder in ("a", "b/c"):
        (tmp_path / folder).mkdir(parents=True)
        (tmp_path / folder / "task.jsonl").write_text(lines)
    monkeypatch.chdir(tmp_path)

    def test_prompts(path, seed=0, **where):
        stream = InstructionIncremental(seed, [{"jsonl": path}], **where).experiences()
        return [e.prompt for e in stream[0].test.load()[0]]

    split = test_prompts(str(tmp_path / "a" / "task.jsonl"))
    # moved, written relative or through ".", or found under scenario.root: the same 8 test examples
    assert test_prompts(str(tmp_path / "b" / "c" / "task.jsonl")) == split
    assert test_prompts("a/task.jsonl") == split and test_prompts("./a/../a/task.jsonl") == split
    assert test_prompts("task.jsonl", root=str(tmp_path / "b" / "c")) == split
    assert len(split) == 8 and test_prompts("a/task.jsonl", seed=1) != split  # the seed still draws it


@pytest.mark.parametrize(
    "line, problem",
    [
        ('{"prompt": "a", "target": "b"', "not valid JSON"),
        ('{"prompt": "a"}', "needs string fields 'target'"),
        ('["a", "b"]', "needs string fields 'prompt' and 'target'"),
        ('{"prompt": "a", "target": 3}', "needs string fields 'target'"),
    ],
)
def test_a_bad_jsonl_line_is_one_line_naming_file_and_line(tmp_path, line, problem):
    path = tmp_path / "task.jsonl"
    path.write_text('{"prompt": "x", "target": "y"}\n\n' + line + "\n")
    with pytest.raises(UserError) as err:
        _examples([{"jsonl": str(path)}])
    message = str(err.value)
    assert message.startswith(f"{path}:3: {problem}") and "\n" not in message


@pytest.mark.parametrize(
    "task, problem",
    [
        ({"task": "add", "jsonl": "x.jsonl"}, "exactly one"),
        ({}, "exactly one"),
        ({"task": "add", "metric": "rouge_l"}, "has its own metric"),
        ({"jsonl": "x.jsonl", "metric": "label_words"}, "needs choices"),
        ({"task": "ad"}, "did you mean 'add'"),
    ],
)
def test_config_mistakes_are_one_line(task, problem):
    raw = {
        "seed": 0,
        "scenario": {"name": "instruction_incremental", "tasks": [task]},
        "backbone": {"name": "mlp"},
        "strategy": {"name": "finetune"},
    }
    with pytest.raises(UserError, match=problem):
        clpeft.config.resolve(raw).scenario.build(seed=0).experiences()
