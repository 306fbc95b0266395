"""``logging.export`` on a generative run through the engine: each task's adapter loads in peft with the
outputs the run's model had after that task, the merged model and its tokenizer load in transformers
with the final model's outputs, a run stopped mid-stream and resumed writes the same files, and
directories are replaced whole. task_lora exports each task's own LoRA and its merged model per task,
each with the run's model routed to that task."""

import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

import clpeft.config
from clpeft.components.generative.export import RunExports, replace_directory
from clpeft.components.generative.task_adapters import task_lora
from clpeft.engine import Engine
from clpeft.errors import UserError

PROMPTS = ["q abcd", "q hgfe", "r bbca"]


def _config(tasks, weights, name, export=("adapters", "merged"), **options):
    return clpeft.config.resolve(
        {
            "seed": 0,
            "scenario": {"name": "instruction_incremental", "tasks": [{"jsonl": str(p), "max_new_tokens": 4} for p in tasks]},
            "backbone": {"name": "generative_lm", "weights": str(weights)},
            "strategy": {"name": name, "lora_targets": ["q_proj", "v_proj", "down_proj"], "lora_rank": 4, **options},
            "train": {"epochs": 2, "batch_size": 8, "lr": 0.01, "optimizer": "adam"},
            "eval": {"batch_size": 32, "baseline": False},
            "logging": {"tensorboard": False, "progress": "never", "export": list(export)},
        }
    )


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids).logits


def _ids(backbone) -> torch.Tensor:
    rows = [backbone.prompt_ids(p) for p in PROMPTS]
    assert len({len(r) for r in rows}) == 1  # one length: no padding to get right
    return torch.tensor(rows)


def test_o_lora_adapters_per_task_and_the_merged_model_load_with_the_runs_outputs(tiny_lm, two_tasks, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    engine = Engine(_config(two_tasks, tiny_lm, "o_lora"), tmp_path / "run", device="cpu")
    run = engine.build()
    backbone = run.strategy.backbone
    ids, after_task = _ids(backbone), []
    evaluated = run.strategy.after_evaluation

    def record(exp, row):  # the run's model as it is after each task
        after_task.append(_logits(backbone.net, ids))
        evaluated(exp, row)

    run.strategy.after_evaluation = record
    engine.run(run)

    plain = _logits(AutoModelForCausalLM.from_pretrained(tiny_lm), ids)
    assert not torch.allclose(after_task[0], plain, atol=1e-3) and not torch.allclose(after_task[1], after_task[0], atol=1e-3)
    adapters = tmp_path / "run" / "adapters"
    assert sorted(p.name for p in adapters.iterdir()) == ["task_0", "task_1"]
    for k in (0, 1):
        peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_lm), adapters / f"task_{k}").eval()
        torch.testing.assert_close(_logits(peft_model, ids), after_task[k], atol=1e-5, rtol=1e-5)

    # task 1's adapter is O-LoRA's sum: task 0's LoRA, unchanged, then task 1's own (rank 4 each)
    first, second = (load_file(adapters / f"task_{k}" / "adapter_model.safetensors") for k in (0, 1))
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    assert first[key].shape == (4, 32) and second[key].shape == (8, 32)
    torch.testing.assert_close(second[key][:4], first[key], atol=0, rtol=0)
    own = run.strategy.generative.lora["model.layers.0.self_attn.q_proj"]  # task 1's LoRA alone: the last 4 rows, half the alpha
    torch.testing.assert_close(second[key][4:], own.lora_A.detach(), atol=0, rtol=0)
    alphas = json.loads((adapters / "task_1" / "adapter_config.json").read_text())["alpha_pattern"]
    assert alphas[re.escape("model.layers.0.self_attn.q_proj")] == pytest.approx(2 * own.alpha)

    merged = tmp_path / "run" / "merged"
    model = AutoModelForCausalLM.from_pretrained(merged).eval()
    assert not any("lora" in name for name, _ in model.named_parameters())
    torch.testing.assert_close(_logits(model, ids), after_task[1], atol=1e-5, rtol=1e-5)
    tokenizer = AutoTokenizer.from_pretrained(merged)
    assert tokenizer("q abcd\n")["input_ids"] == backbone.tokenizer("q abcd\n")["input_ids"]
    assert tokenizer.eos_token == backbone.tokenizer.eos_token and tokenizer.pad_token == backbone.tokenizer.pad_token


def test_task_lora_exports_each_tasks_own_lora_and_merged_model_with_the_run_routed_to_that_task(tiny_lm, distinct_tasks, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    engine = Engine(_config(distinct_tasks, tiny_lm, "task_lora", max_tasks=3, lora_alpha=6), tmp_path / "run", device="cpu")
    run = engine.build()
    strategy, backbone = run.strategy, run.strategy.backbone
    ids, after_task = _ids(backbone), []
    evaluated = strategy.after_evaluation

    def record(exp, row):  # the run's model routed to the task just trained, as it is then
        with strategy.adapters.routed(torch.full((len(ids),), exp.index)):
            after_task.append(_logits(backbone.net, ids))
        rng = torch.get_rng_state()
        assert task_lora(backbone.net, exp.index) and torch.equal(torch.get_rng_state(), rng)  # exporting draws no random numbers
        evaluated(exp, row)

    strategy.after_evaluation = record
    engine.run(run)

    plain = _logits(AutoModelForCausalLM.from_pretrained(tiny_lm), ids)
    assert not torch.allclose(after_task[0], plain, atol=1e-3) and not torch.allclose(after_task[1], after_task[0], atol=1e-3)
    out = tmp_path / "run"
    assert (
        sorted(p.name for p in (out / "adapters").iterdir()) == sorted(p.name for p in (out / "merged").iterdir()) == ["task_0", "task_1"]
    )
    for k in (0, 1):
        peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_lm), out / "adapters" / f"task_{k}").eval()
        torch.testing.assert_close(_logits(peft_model, ids), after_task[k], atol=1e-5, rtol=1e-5)
        merged = AutoModelForCausalLM.from_pretrained(out / "merged" / f"task_{k}").eval()
        assert not any("lora" in name for name, _ in merged.named_parameters())
        torch.testing.assert_close(_logits(merged, ids), after_task[k], atol=1e-5, rtol=1e-5)
        assert (
            AutoTokenizer.from_pretrained(out / "merged" / f"task_{k}")("r bbca\n")["input_ids"]
            == backbone.tokenizer("r bbca\n")["input_ids"]
        )

        # task k's own LoRA: its slice of the stacked factors, rank 4, the strategy's alpha
        stored = load_file(out / "adapters" / f"task_{k}" / "adapter_model.safetensors")
        layer = strategy.adapters.layers["model.layers.1.mlp.down_proj"]
        torch.testing.assert_close(
            stored["base_model.model.model.layers.1.mlp.down_proj.lora_A.weight"], layer.lora_A[k].detach(), atol=0, rtol=0
        )
        torch.testing.assert_close(
            stored["base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"], layer.lora_B[k].detach(), atol=0, rtol=0
        )
        config = json.loads((out / "adapters" / f"task_{k}" / "adapter_config.json").read_text())
        assert len(config["rank_pattern"]) == 3 * 2  # q_proj, v_proj and down_proj of both blocks
        assert set(config["rank_pattern"].values()) == {4} and set(config["alpha_pattern"].values()) == {6.0}


class Stop(Exception):
    """Raised in place of the second task: the run is killed after the first."""


def _files(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("strategy, merged_when_stopped", [("seq_finetune", []), ("task_lora", ["task_0"])])
def test_a_run_stopped_mid_stream_resumes_to_the_same_exports(strategy, merged_when_stopped, tiny_lm, two_tasks, tmp_path):
    cfg = _config(two_tasks, tiny_lm, strategy)
    Engine(cfg, tmp_path / "whole", device="cpu").run()

    engine = Engine(cfg, tmp_path / "stopped", device="cpu")
    run = engine.build()
    begin = run.strategy.before_experience

    def stop_at_the_second(exp):
        if exp.index == 1:
            raise Stop
        begin(exp)

    run.strategy.before_experience = stop_at_the_second
    with pytest.raises(Stop):
        engine.run(run)
    stopped = tmp_path / "stopped"
    assert [p.name for p in (stopped / "adapters").iterdir()] == ["task_0"]
    assert [p.name for p in (stopped / "merged").glob("*")] == merged_when_stopped  # task_lora's: task 0's model
    Engine(cfg, stopped, device="cpu", resume=True).run()

    for sub in ("adapters", "merged"):
        whole, resumed = _files(tmp_path / "whole" / sub), _files(stopped / sub)
        assert sorted(resumed) == sorted(whole) and "task_1/adapter_model.safetensors" in _files(tmp_path / "whole" / "adapters")
        assert [name for name in whole if whole[name] != resumed[name]] == []  # byte for byte: the same tensors and configs
    assert ("task_1/model.safetensors" in _files(stopped / "merged")) == (strategy == "task_lora")
    assert not list(stopped.rglob(".*.tmp")) and not list(stopped.rglob(".*.old"))


def test_exports_are_refused_without_a_generative_model_and_nothing_is_written_when_off(tmp_path):
    not_generative = SimpleNamespace(backbone=torch.nn.Linear(2, 2))
    with pytest.raises(UserError, match=r"logging\.export: exports a generative_lm run's model \(this backbone is Linear\)"):
        RunExports(["merged"], not_generative, tmp_path)
    off = RunExports([], not_generative, tmp_path)
    off.after_experience(0)
    off.after_stream()
    assert list(tmp_path.iterdir()) == []


def test_a_directory_is_replaced_whole_or_not_at_all(tmp_path):
    target = tmp_path / "adapters" / "task_0"

    def write(content: str, fail: bool = False):
        def writer(directory: Path) -> None:
            directory.mkdir()
            (directory / "a.txt").write_text(content)
            if fail:
                raise OSError("disk full")

        return writer

    replace_directory(target, write("first"))
    with pytest.raises(OSError, match="disk full"):
        replace_directory(target, write("partial", fail=True))
    assert (target / "a.txt").read_text() == "first"  # the interrupted write left the old directory as it was
    replace_directory(target, write("second"))
    assert (target / "a.txt").read_text() == "second"
    assert sorted(p.name for p in target.parent.iterdir()) == ["task_0"]  # the stale .task_0.tmp went with the next write
