"""HiDe-Prompt and HiDe-LoRA on their shared base class
(:class:`~clpeft.components.heads.hierarchical_strategy.HierarchicalDecomposition`) keep the
checkpoint keys they had before it, so checkpoints of earlier runs load: the sets below were printed
from the two strategies as they stood at commit 04f97c6, each with its own ``__init__`` and hooks.
Their behaviour is the tests of their own files (``test_hide_prompt.py``, ``test_hide_lora.py``) and
the reference tests against the official code."""

import test_hide_lora
import test_hide_prompt

from clpeft.strategies.hide_lora import HiDeLoRA
from clpeft.strategies.hide_prompt import HiDePrompt

MLP = ("mlp.net.0.bias", "mlp.net.0.weight", "mlp.net.2.bias", "mlp.net.2.weight", "mlp.norm.bias", "mlp.norm.weight")
STATISTICS = ("means", "order", "present", "task_of_class", "variances")
STAGES = {
    "head.bias",
    "head.weight",
    *(f"statistics.{k}" for k in STATISTICS),
    *(f"task_identity.{k}" for k in ("head.bias", "head.weight", *MLP)),
    *(f"task_identity.statistics.{k}" for k in STATISTICS),
}


def _keys(strategy) -> tuple[set[str], set[str]]:
    """The strategy's own keys and its backbone's."""
    keys = set(strategy.state_dict())
    backbone = {k for k in keys if k.startswith("backbone.")}
    return keys - backbone, backbone


def test_hide_prompt_checkpoints_keep_their_keys():
    own, backbone = _keys(HiDePrompt(test_hide_prompt._backbone(), **test_hide_prompt.PARAMS))
    assert own == STAGES | {"prompt_tasks.prompts"}
    assert backbone == {f"backbone.{k}" for k in test_hide_prompt._backbone().state_dict()}  # the prompts are not in the ViT


def test_hide_lora_checkpoints_keep_their_keys():
    strategy = HiDeLoRA(test_hide_lora._backbone(), **test_hide_lora.PARAMS)  # LoRA on blocks 0 and 1, keys and values
    own, backbone = _keys(strategy)
    assert own == STAGES
    lora = {k for k in backbone if ".lora_" in k or k.endswith(".scaling")}
    assert lora == {f"backbone.net.blocks.{i}.attn.qkv.{p}.{t}" for i in (0, 1) for p in "kv" for t in ("lora_A", "lora_B", "scaling")}
    assert {k for k in backbone if ".base_layer." in k} == {
        f"backbone.net.blocks.{i}.attn.qkv.{p}.base_layer.{t}" for i in (0, 1) for p in "kv" for t in ("weight", "bias")
    }
