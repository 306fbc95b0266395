"""generative_lm on a tiny random Llama: the answer-only loss by hand, chat template, batched KV-cache
generation against a plain greedy loop, left padding, stop strings."""

import pytest
import torch
import torch.nn.functional as F

from clpeft.backbones.generative_lm import IGNORE, GenerativeLM
from clpeft.errors import UserError
from clpeft.instructions import Instruction

PROMPTS = ["q ab", "Reverse: abcdefgh", "x"]


@pytest.fixture(scope="module")
def lm(tiny_lm):
    return GenerativeLM(weights=str(tiny_lm))


def _ids(lm, text):
    return lm.tokenizer.convert_tokens_to_ids(list(text))


def test_training_batch_and_loss_cover_the_answer_tokens_only(lm):
    examples = [Instruction("q ab", "xy"), Instruction("Sort: 3 1", "1 3")]
    ids, mask, labels = lm.training_batch(examples)
    first = _ids(lm, "q ab\n") + _ids(lm, "xy") + [lm.eos_id]
    second = _ids(lm, "Sort: 3 1\n") + _ids(lm, "1 3") + [lm.eos_id]
    assert ids[0, : len(first)].tolist() == first and ids[1].tolist() == second
    assert (ids[0, len(first) :] == lm.pad_id).all() and mask[0].tolist() == [1] * len(first) + [0] * (len(second) - len(first))
    assert labels[0].tolist() == [IGNORE] * 5 + _ids(lm, "xy") + [lm.eos_id] + [IGNORE] * (len(second) - len(first))
    assert labels[1].tolist() == [IGNORE] * 10 + _ids(lm, "1 3") + [lm.eos_id]
    # by hand: each sequence alone, the cross-entropy of predicting its answer tokens, averaged over all 7
    terms = []
    for seq, n_prompt in ((first, 5), (second, 10)):
        with torch.no_grad():
            logits = lm.net(torch.tensor([seq])).logits[0]
        for t in range(n_prompt, len(seq)):
            terms.append(F.cross_entropy(logits[t - 1], torch.tensor(seq[t])))
    with torch.no_grad():
        assert lm.loss(examples).item() == pytest.approx(torch.stack(terms).mean().item(), abs=1e-5)


def test_a_long_pair_keeps_its_answer_and_the_end_of_its_prompt(tiny_lm):
    lm = GenerativeLM(weights=str(tiny_lm), max_length=8)
    ids, _, labels = lm.training_batch([Instruction("abcdefghij", "xyz")])
    assert ids[0].tolist() == _ids(lm, "hij\n") + _ids(lm, "xyz") + [lm.eos_id]
    assert (labels[0] != IGNORE).sum() == 4
    assert lm.generate(["abcdefghij"], 6) == lm.generate(["defghij"], 6)  # the prompt's last 8 tokens: "defghij\n"


def test_the_chat_template_wraps_the_prompt(tiny_chat_lm, tiny_lm):
    chat = GenerativeLM(weights=str(tiny_chat_lm))
    assert chat.chat_template and chat.tokenizer.decode(chat.prompt_ids("Add")) == "<user>Add\n<assistant>"
    plain = GenerativeLM(weights=str(tiny_chat_lm), chat_template=False)
    assert plain.tokenizer.decode(plain.prompt_ids("Add")) == "Add\n"
    assert not GenerativeLM(weights=str(tiny_lm)).chat_template  # no template in the tokenizer


def _greedy_without_cache(lm, prompt, n):
    ids = lm.prompt_ids(prompt)
    out = []
    with torch.no_grad():
        for _ in range(n):
            token = int(lm.net(torch.tensor([ids])).logits[0, -1].argmax())
            if token == lm.eos_id:
                break
            ids.append(token)
            out.append(token)
    return lm.tokenizer.decode(out, skip_special_tokens=True)


def test_batched_left_padded_generation_equals_one_prompt_at_a_time_without_cache(lm):
    expected = [_greedy_without_cache(lm, p, 10) for p in PROMPTS]
    assert lm.generate(PROMPTS, 10) == expected
    assert [lm.generate([p], 10)[0] for p in PROMPTS] == expected
    assert len(set(expected)) > 1 and all(expected)  # the random model writes something different per prompt


def test_stop_strings_cut_the_answer(lm):
    full = lm.generate(["q ab"], 12)[0]
    stop = next(c for c in full[1:] if c != full[0])
    assert lm.generate(["q ab"], 12, stop=[stop])[0] == full[: full.index(stop)]
    assert lm.generate(["q ab"], 3)[0] == full[:3]  # max_new_tokens: one character per token here


def test_images_are_refused(tiny_lm):
    with pytest.raises(UserError, match="instruction_incremental"):
        GenerativeLM(input_shape=(3, 32, 32), weights=str(tiny_lm))


def test_a_packaged_model_of_another_kind_is_refused_by_name():
    """``minilm-l6`` is a sentence encoder: the generative backbone names its kind and what it needs."""
    from clpeft.backbones.generative_lm import load_causal_lm

    with pytest.raises(UserError, match="'minilm-l6' is a text_encoder model; generative_lm needs a decoder LLM"):
        load_causal_lm("minilm-l6")


def test_gradient_checkpointing_recomputes_layers_and_keeps_loss_and_gradients(tiny_lm):
    examples = [Instruction("q ab", "xy"), Instruction("Sort: 3 1", "1 3")]
    results = []
    for checkpointing in (False, True):
        lm = GenerativeLM(weights=str(tiny_lm), gradient_checkpointing=checkpointing)
        for p in lm.net.model.layers.parameters():
            p.requires_grad_(True)
        lm.train()  # a backbone with trainable parameters trains (a frozen one stays in eval mode)
        calls = []
        lm.net.model.layers[0].self_attn.register_forward_pre_hook(lambda *_: calls.append(1))  # inside the checkpointed layer
        loss = lm.loss(examples)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in lm.net.model.layers.named_parameters()}
        results.append((loss.detach(), grads, len(calls)))
    (plain_loss, plain_grads, plain_calls), (ckpt_loss, ckpt_grads, ckpt_calls) = results
    assert (plain_calls, ckpt_calls) == (1, 2)  # the layer runs again in the backward pass
    torch.testing.assert_close(ckpt_loss, plain_loss)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(ckpt_grads[name], grad, rtol=1e-5, atol=1e-6)
