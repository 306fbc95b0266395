"""A tiny random Llama (hidden 32, 2 layers) with a character-level tokenizer, saved as a transformers
directory: what the LLM tests and the registry smoke test run on, in seconds."""

from __future__ import annotations

import string
from pathlib import Path

SPECIALS = ("<pad>", "<eos>", "<unk>")
CHARACTERS = string.ascii_letters + string.digits + string.punctuation + " \n"


def char_tokenizer():
    """A ``PreTrainedTokenizerFast`` with one token per character (no merges) and pad/eos/unk."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate([*SPECIALS, *CHARACTERS])}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>")


def save_tiny_llama(directory: Path, seed: int = 0, chat_template: str | None = None) -> Path:
    """Write a random 2-layer Llama (hidden 32) and its character tokenizer into ``directory``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = char_tokenizer()
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    LlamaForCausalLM(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
