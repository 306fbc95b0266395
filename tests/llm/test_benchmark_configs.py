"""The standard CL benchmark (O-LoRA's orders 1-3) and TRACE configs: they validate, list the tasks in
the official scripts' orders, say in one line what data is missing and where it goes, and run on a
tiny Llama once the data is there."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from clpeft import config
from clpeft.cli import main

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "llm"
#: the task orders of github.com/cmnfriend/O-LoRA scripts/order_{1,2,3}.sh and BeyonderXX/TRACE scripts/train_lora.sh
ORDERS = {
    "standard_cl_order1_o_lora.yaml": ["dbpedia", "amazon", "yahoo", "agnews"],
    "standard_cl_order2_o_lora.yaml": ["dbpedia", "amazon", "agnews", "yahoo"],
    "standard_cl_order3_o_lora.yaml": ["yahoo", "amazon", "agnews", "dbpedia"],
    "trace_o_lora.yaml": ["C-STANCE", "FOMC", "MeetingBank", "Py150", "ScienceQA", "NumGLUE-cm", "NumGLUE-ds", "20Minuten"],
}


@pytest.mark.parametrize("name", ORDERS)
def test_a_benchmark_config_validates_in_the_official_order(name, capsys):
    assert main(["validate", str(CONFIGS / name), "--config-only"]) == 0, capsys.readouterr().err
    cfg = config.load(CONFIGS / name)
    assert [t.jsonl for t in cfg.scenario.build(seed=0).tasks] == ORDERS[name]
    assert cfg.strategy.name == "o_lora" and cfg.strategy.params["orthogonal_weight"] == 0.5


@pytest.mark.parametrize("name", ORDERS)
def test_a_run_without_the_data_says_in_one_line_what_is_missing_and_where(name, tmp_path, capsys):
    root = tmp_path / "absent"
    code = main(["run", str(CONFIGS / name), "--set", f"scenario.root={root}", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert f"missing data under {root}: {', '.join(ORDERS[name])} (" in err and "scenario.root" in err


def test_only_the_missing_files_are_named(tmp_path, capsys):
    for task in ORDERS["standard_cl_order1_o_lora.yaml"][1:]:
        (tmp_path / task).mkdir()
        for split in ("train", "test"):
            (tmp_path / task / f"{split}.jsonl").write_text(json.dumps({"prompt": "p", "target": "World"}) + "\n")
    (tmp_path / "agnews" / "test.jsonl").unlink()
    assert main(["validate", str(CONFIGS / "standard_cl_order1_o_lora.yaml"), "--set", f"scenario.root={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert f"missing data under {tmp_path}: dbpedia, agnews/test.jsonl (" in err and err.count("\n") == 1, err


def test_with_the_data_a_benchmark_order_runs_on_a_tiny_llama(tmp_path, tiny_chat_lm):
    """Two examples per split and task, in the chat format and the plain one: the four-task run fills a 4 x 4 matrix over both lines of each test file."""
    name = "standard_cl_order1_o_lora.yaml"
    for task in config.load(CONFIGS / name).scenario.build(seed=0).tasks:
        label = (task.choices or ["five stars"])[0]
        (tmp_path / task.jsonl).mkdir()
        for split in ("train", "test"):
            rows = [
                {"prompt": f"{task.jsonl} text", "target": label},
                {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": label}]},
            ]
            (tmp_path / task.jsonl / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    overrides = [f"scenario.root={tmp_path}", f"backbone.weights={tiny_chat_lm}", "backbone.max_length=64", "strategy.lora_rank=2"]
    out = tmp_path / "run"
    assert main(["run", str(CONFIGS / name), "--out", str(out), "--device", "cpu", *(a for o in overrides for a in ("--set", o))]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert [len(row) for row in metrics["acc_matrix"]] == [4] * 4 and metrics["test_sizes"] == [2] * 4
