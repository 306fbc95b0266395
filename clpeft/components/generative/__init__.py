"""Strategies on a generative LLM: the LoRA, answer-token loss and scored answers they share (:class:`InstructionTuning`), and general-ability retention (:class:`PerplexityRetention`)."""

from clpeft.components.generative.generative_hooks import GenerativeHooks
from clpeft.components.generative.instruction_tuning import GenerativeOptions, InstructionTuning
from clpeft.components.generative.perplexity_retention import PerplexityRetention, general_texts

__all__ = ["GenerativeHooks", "GenerativeOptions", "InstructionTuning", "PerplexityRetention", "general_texts"]
