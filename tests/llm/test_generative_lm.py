"""generative_lm on a tiny random Llama: the answer-only loss by hand, chat template, batched KV-cache
generation against a plain greedy loop, left padding, stop strings."""

from contextlib import contextmanager

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


# ---------------------------------------------------------------- shared prefix, rows leaving the batch

SHARED = "Answer briefly. "  # 16 characters: 16 tokens of the character tokenizer


@contextmanager
def _forwards(lm):
    """``(shapes, logits)`` of every forward while inside: its ``input_ids``' shape, its last position's logits."""
    shapes, logits = [], []

    def record(_, args, kwargs, out):
        shapes.append(tuple(kwargs["input_ids"].shape))
        logits.append(out.logits[:, -1])

    handle = lm.net.register_forward_hook(record, with_kwargs=True)
    try:
        yield shapes, logits
    finally:
        handle.remove()


def _alone(lm, ids):
    """By hand: the next-token logits after ``ids``, one sequence, no cache, default positions."""
    with torch.no_grad():
        return lm.net(torch.tensor([ids])).logits[0, -1]


def _cut_at(text, stop):
    """By hand: ``text`` before the first stop string it holds."""
    return text[: min([text.find(s) for s in stop if s in text], default=len(text))]


def test_a_shared_prefix_runs_once_and_finished_rows_leave_the_batch(lm):
    prompts = [SHARED + "q ab", SHARED + "7 + 5 =", SHARED + "Reverse: abcdefgh"]
    expected = [_greedy_without_cache(lm, p, 14) for p in prompts]
    assert [len(a) for a in expected] == [8, 11, 14]  # the random model writes end-of-sequence after 8 and 11 tokens
    with _forwards(lm) as (shapes, logits):
        assert lm.generate(prompts, 14) == expected
    # the prefix once, then the suffixes padded to the longest ("Reverse: abcdefgh\n", 18 tokens) instead of 3 x 34 tokens
    assert shapes[:2] == [(1, 16), (3, 18)]
    # 13 one-token steps: 3 rows until the second row stops (token 12 is its end-of-sequence), then the last row alone
    assert shapes[2:] == [(3, 1)] * 11 + [(1, 1)] * 2
    # the numbers, not only the argmax: each row's first logits, and the last row's after its 13 tokens, as alone
    rows = [lm.prompt_ids(p) for p in prompts]
    torch.testing.assert_close(logits[1], torch.stack([_alone(lm, r) for r in rows]))
    torch.testing.assert_close(logits[-1][0], _alone(lm, rows[2] + _ids(lm, expected[2][:13])))
    assert [lm.generate([p], 14)[0] for p in prompts] == expected  # one at a time: no shared prefix


def test_rows_stopped_by_stop_strings_leave_the_batch(lm):
    prompts = [SHARED + "q ab", SHARED + "7 + 5 =", SHARED + "Reverse: abcdefgh", SHARED + "x"]
    stop = ["|", "V"]
    full = [_greedy_without_cache(lm, p, 14) for p in prompts]
    expected = [_cut_at(a, stop) for a in full]
    assert expected == [full[0], full[1], full[2][:3], full[3][:4]]  # two rows stop at a stop string, two at end-of-sequence
    with _forwards(lm) as (shapes, logits):
        assert lm.generate(prompts, 14, stop=stop) == expected
    # "|" is row 3's 4th token, "V" row 4's 5th: then half the rows have stopped and leave; row 1's end-of-sequence
    # (its 9th token) halves the batch again; row 2 writes 11 tokens, then end-of-sequence ends the loop
    assert shapes[2:] == [(4, 1)] * 4 + [(2, 1)] * 4 + [(1, 1)] * 3
    assert [lm.generate([p], 14, stop=stop)[0] for p in prompts] == expected


def test_prompts_sharing_fewer_than_8_tokens_are_prefilled_whole(lm):
    for shared, first in (("Answr: ", (3, 25)), ("Answer: ", (1, 8))):
        prompts = [shared + "q ab", shared + "7 + 5 =", shared + "Reverse: abcdefgh"]
        with _forwards(lm) as (shapes, logits):
            answers = lm.generate(prompts, 6)
        assert shapes[0] == first
        assert answers == [_greedy_without_cache(lm, p, 6) for p in prompts]


def test_identical_prompts_and_a_prompt_inside_another_keep_a_token_of_their_own(lm):
    prompts = [SHARED + "q", SHARED + "q", SHARED + "q ab"]  # 18, 18 and 21 tokens with the newline
    with _forwards(lm) as (shapes, logits):
        answers = lm.generate(prompts, 8)
    assert shapes[:2] == [(1, 17), (3, 4)]  # "Answer briefly. q", then "\n", "\n", " ab\n" padded to 4
    assert answers == [_greedy_without_cache(lm, p, 8) for p in prompts]
    assert answers[0] == answers[1] != answers[2]


def test_chat_prompts_share_their_template_and_context(tiny_chat_lm):
    chat = GenerativeLM(weights=str(tiny_chat_lm))
    context = (("system", "You answer."),)
    prompts = [Instruction(f"Task 12, answer: {e}", "", context=context) for e in ("q ab", "Reverse: abcdefgh", "7 + 5 =", "Sort: 3 1")]
    expected = [_greedy_without_cache(chat, p, 14) for p in prompts]
    assert [len(a) for a in expected] == [5, 11, 6, 5]
    with _forwards(chat) as (shapes, logits):
        assert chat.generate(prompts, 14) == expected
    prefix = "<system>You answer.\n<user>Task 12, answer: "
    assert shapes[:2] == [(1, len(prefix)), (4, len("Reverse: abcdefgh\n<assistant>"))]
    # rows 1 and 4 end after 5 tokens (half the batch leaves), row 3 after 6, row 2 after 11
    assert shapes[2:] == [(4, 1)] * 5 + [(2, 1)] + [(1, 1)] * 5
    torch.testing.assert_close(logits[1], torch.stack([_alone(chat, chat.prompt_ids(p)) for p in prompts]))
    torch.testing.assert_close(logits[-1][0], _alone(chat, chat.prompt_ids(prompts[1]) + _ids(chat, expected[1][:11])))
    stop = ["W"]
    assert chat.generate(prompts, 14, stop=stop) == [_cut_at(a, stop) for a in expected]


def test_rows_routed_to_their_own_adapters_keep_their_places(tiny_lm):
    """Per-row adapters (``MultiLoRALinear`` in ``route``) change the shared prefix's keys and values per row,
    and routing follows the batch's rows: whole prompts, no row dropped, each answer as its adapter's alone."""
    from clpeft.components.lora.batched import inject_multi_lora, route

    routed = GenerativeLM(weights=str(tiny_lm))
    torch.manual_seed(0)
    for layer in inject_multi_lora(routed.net, ["q_proj", "v_proj"], n_adapters=2, rank=4, alpha=8).values():
        torch.nn.init.normal_(layer.lora_B, std=0.5)
    prompts = [SHARED + "q ab", SHARED + "7 + 5 =", SHARED + "Reverse: abcdefgh"]
    adapters = torch.tensor([0, 1, 0])
    alone = []
    for prompt, adapter in zip(prompts, adapters):
        with route(routed.net, adapter[None]):
            alone.append(routed.generate([prompt], 14)[0])
    with route(routed.net, adapters), _forwards(routed) as (shapes, _):
        assert routed.generate(prompts, 14) == alone
    assert shapes[0] == (3, 34) and {b for b, _ in shapes} == {3}
    with route(routed.net, torch.tensor([1])):
        assert routed.generate([prompts[0]], 14)[0] != alone[0]  # the adapters differ: a shared prefix would mix them up
