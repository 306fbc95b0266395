"""Strategies on a generative LLM: the LoRA, answer-token loss and scored answers they share (:class:`InstructionTuning`)."""

from clpeft.components.generative.instruction_tuning import GenerativeOptions, InstructionTuning

__all__ = ["GenerativeOptions", "InstructionTuning"]
