"""merge_cl on a generative LLM (the tiny random Llama): each task's LoRA is a task vector, and the
projections the model answers with are the pretrained weights plus the merge of those vectors,
checked against the LoRA updates computed by hand; a run through the engine fills the matrix and
resumes exactly; the classifier path's LoRA keys are refused in one line."""

import numpy as np
import pytest
import torch
from test_seq_finetune import _config

from clpeft.backbones.generative_lm import GenerativeLM
from clpeft.engine import Engine
from clpeft.errors import UserError
from clpeft.scenarios.instruction_incremental import InstructionIncremental
from clpeft.strategies.merge_cl import MergeCL


def _train_one_step(strategy, exp, seed):
    """Give the task's LoRA a non-zero update (as training would), then close the experience."""
    strategy.before_experience(exp)
    torch.manual_seed(seed)
    with torch.no_grad():
        for layer in strategy.lora.values():
            layer.lora_B.normal_(std=0.1)
    factors = {name: (layer.lora_A.detach().clone(), layer.lora_B.detach().clone()) for name, layer in strategy.lora.items()}
    strategy.after_experience(exp)
    return factors


@pytest.mark.parametrize(
    ("method", "params", "combine"), [("task_arithmetic", {"scale": 1.0}, sum), ("mean", {}, lambda d: sum(d) / len(d))]
)
def test_the_answering_projections_are_the_pretrained_ones_plus_the_merged_lora_updates(tiny_lm, distinct_tasks, method, params, combine):
    stream = InstructionIncremental(0, [{"jsonl": str(p), "max_new_tokens": 4} for p in distinct_tasks]).experiences()
    strategy = MergeCL(
        GenerativeLM(weights=str(tiny_lm)),
        method=method,
        merge_params=params,
        lora_targets=["q_proj", "v_proj"],
        lora_rank=2,
        lora_alpha=4.0,
    )
    pretrained = {name: layer.base_layer.weight.detach().clone() for name, layer in strategy.lora.items()}
    assert set(pretrained) == {n for n, _ in strategy.backbone.net.named_modules() if n.endswith(("q_proj", "v_proj"))}
    updates = [_train_one_step(strategy, exp, seed) for seed, exp in enumerate(stream)]
    for name, layer in strategy.lora.items():
        deltas = [4.0 / 2 * (b @ a) for a, b in (u[name] for u in updates)]  # (alpha / r) B A of each task
        torch.testing.assert_close(layer.base_layer.weight, pretrained[name] + combine(deltas), rtol=1e-5, atol=1e-6)
        assert torch.count_nonzero(layer.lora_B) == 0  # the next task starts from a fresh LoRA


def test_a_run_learns_both_tasks_fills_the_matrix_and_resumes_exactly(tiny_lm, distinct_tasks, tmp_path):
    tasks = [{"jsonl": str(p), "max_new_tokens": 4} for p in distinct_tasks]
    # start_from: merged: the second LoRA trains on the merged model, so the merge (scale 1) is the model it
    # trained. From the base instead, these two toy tasks' LoRAs ("any prompt -> ab", "any prompt -> ba")
    # conflict and their sum answers neither (0.0, 0.0): the interference merging methods are about.
    cfg = _config(tasks, tiny_lm, name="merge_cl", merge_params={"scale": 1.0}, start_from="merged", general_text_samples=0)
    result = Engine(cfg, tmp_path / "full", device="cpu").run()
    R = np.asarray(result["acc_matrix"])
    assert R.shape == (2, 2) and R[0, 0] == 1.0 and R[1, 1] >= 0.5  # the merged task vectors answer the task just trained

    class Stop(Exception):
        pass

    def stop_after_first(self, exp):
        if exp.index == 1:
            raise Stop

    original = MergeCL.before_experience
    MergeCL.before_experience = lambda self, exp: (stop_after_first(self, exp), original(self, exp))[1]
    try:
        with pytest.raises(Stop):
            Engine(cfg, tmp_path / "resumed", device="cpu").run()
    finally:
        MergeCL.before_experience = original
    resumed = Engine(cfg, tmp_path / "resumed", device="cpu", resume=True).run()
    np.testing.assert_array_equal(np.asarray(resumed["acc_matrix"]), R)


def test_the_classifier_paths_lora_keys_and_full_mode_are_refused(tiny_lm):
    lm = GenerativeLM(weights=str(tiny_lm))
    with pytest.raises(UserError, match=r"strategy.rank: on a generative_lm backbone the LoRA is set by lora_rank"):
        MergeCL(lm, rank=4)
    with pytest.raises(UserError, match=r"strategy.mode: on a generative_lm backbone merge_cl merges one plain LoRA per task"):
        MergeCL(lm, mode="full")
