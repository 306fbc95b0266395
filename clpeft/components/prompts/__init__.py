"""Prompt pools on a frozen ViT: L2P's key-query pool, DualPrompt's prefix G/E-prompts, CODA-Prompt's attention-weighted components, and what they share (the query, the promptable-backbone check)."""

from clpeft.components.prompts.attention_prompt_pool import AttentionPromptPool
from clpeft.components.prompts.one_prompt import OnePrompt
from clpeft.components.prompts.prefix_prompt import PrefixPrompt, PrefixSelection
from clpeft.components.prompts.prompt_pool import PromptPool, PromptSelection
from clpeft.components.prompts.prompted import promptable_width, query_of
from clpeft.components.prompts.task_prompts import TaskPrefixPrompts

__all__ = [
    "AttentionPromptPool",
    "OnePrompt",
    "PrefixPrompt",
    "PrefixSelection",
    "promptable_width",
    "PromptPool",
    "PromptSelection",
    "query_of",
    "TaskPrefixPrompts",
]
