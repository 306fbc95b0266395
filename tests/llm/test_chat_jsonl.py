"""Chat messages in JSONL: parsed into prompt, context and target, rendered by the tokenizer's chat
template exactly as ``apply_chat_template(messages[:-1], add_generation_prompt=True)``, with the loss
on the last assistant message only; bad lines are one-line errors naming file and line."""

import json
from collections.abc import Mapping

import pytest
import torch

from clpeft.backbones.generative_lm import IGNORE, GenerativeLM
from clpeft.components.generative import GenerativeOptions, InstructionTuning
from clpeft.data import Batch
from clpeft.errors import UserError
from clpeft.instructions import Instruction
from clpeft.scenarios.instruction_incremental import InstructionIncremental
from clpeft.text_metrics import score

MESSAGES = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "q ab"},
    {"role": "assistant", "content": "ba"},
    {"role": "user", "content": "q cd"},
    {"role": "assistant", "content": "dc"},
]
CHAT = Instruction("q cd", "dc", context=(("system", "Answer briefly."), ("user", "q ab"), ("assistant", "ba")))


@pytest.fixture(scope="module")
def chat_lm(tiny_chat_lm):
    return GenerativeLM(weights=str(tiny_chat_lm))


def _template_ids(tokenizer, messages) -> list[int]:
    out = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    return list(out["input_ids"] if isinstance(out, Mapping) else out)


def _stream(tmp_path, lines):
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path, InstructionIncremental(0, [{"jsonl": str(path), "test_fraction": 0.5}]).experiences()


def test_a_messages_line_becomes_prompt_context_and_target(tmp_path):
    lines = [{"messages": MESSAGES}, {"prompt": "q ef", "target": "fe"}]
    _, (exp,) = _stream(tmp_path, lines)
    examples = sorted(exp.train.load()[0] + exp.test.load()[0], key=lambda e: e.prompt)
    assert examples == [CHAT, Instruction("q ef", "fe")]


def test_the_prompt_is_the_chat_template_of_every_message_but_the_answer(chat_lm):
    expected = _template_ids(chat_lm.tokenizer, MESSAGES[:-1])
    assert chat_lm.prompt_ids(CHAT) == chat_lm.prompt_ids(CHAT.prompt, CHAT.context) == expected
    assert chat_lm.prompt_ids("q cd") == _template_ids(chat_lm.tokenizer, MESSAGES[3:4])  # a plain prompt: one user turn


def test_the_loss_covers_only_the_last_assistant_message(chat_lm):
    ids, mask, labels = chat_lm.training_batch([CHAT])
    prompt = _template_ids(chat_lm.tokenizer, MESSAGES[:-1])
    answer = [*chat_lm.tokenizer("dc", add_special_tokens=False)["input_ids"], chat_lm.eos_id]
    assert ids[0].tolist() == prompt + answer and mask.all()
    assert labels[0].tolist() == [IGNORE] * len(prompt) + answer  # the earlier answer "ba" sits in the prompt, unlabelled
    logits = chat_lm.net(ids).logits[0, len(prompt) - 1 : -1]
    with torch.no_grad():
        assert chat_lm.loss([CHAT]).item() == pytest.approx(
            torch.nn.functional.cross_entropy(logits, torch.tensor(answer)).item(), abs=1e-5
        )


def test_generation_answers_the_whole_chat(chat_lm):
    seq, tokens = _template_ids(chat_lm.tokenizer, MESSAGES[:-1]), []
    with torch.no_grad():
        for _ in range(6):  # a plain greedy loop without cache, over the whole chat's template
            token = int(chat_lm.net(torch.tensor([seq + tokens])).logits[0, -1].argmax())
            if token == chat_lm.eos_id:
                break
            tokens.append(token)
    assert tokens and chat_lm.generate([CHAT], 6) == [chat_lm.tokenizer.decode(tokens, skip_special_tokens=True)]
    assert chat_lm.generate([CHAT], 6) != chat_lm.generate([CHAT.prompt], 6)  # the context changes the answer


def test_without_a_chat_template_each_earlier_message_is_a_line(tiny_lm):
    lm = GenerativeLM(weights=str(tiny_lm))
    assert lm.prompt_ids(CHAT) == list(lm.tokenizer("Answer briefly.\nq ab\nba\nq cd\n")["input_ids"])


@pytest.mark.parametrize(
    "messages, problem",
    [
        (MESSAGES[:-1], "the last message is 'user'; it must be the assistant's answer"),
        ([{"role": "bot", "content": "hi"}, MESSAGES[2]], "message 0 has role 'bot'; roles are system, user, assistant"),
        ([MESSAGES[1], {"role": "assistant", "content": " "}], "message 1 (assistant) has no content"),
        ([MESSAGES[1], {"role": "assistant"}], "message 1 (assistant) has no content"),
        ([MESSAGES[0], MESSAGES[2]], "the answer must follow a user message"),
        ([], "'messages' must be a non-empty list"),
        ("hi", "'messages' must be a non-empty list"),
    ],
)
def test_a_bad_messages_line_is_one_line_naming_file_and_line(tmp_path, messages, problem):
    with pytest.raises(UserError) as err:
        _stream(tmp_path, [{"messages": MESSAGES}, {"messages": messages}])
    message = str(err.value)
    assert message.startswith(f"{tmp_path / 'chat.jsonl'}:2: {problem}") and "\n" not in message


def test_scoring_answers_the_whole_chat(tiny_chat_lm):
    """The engine's score hook generates from the whole chat, as training reads it (not the last user turn alone)."""
    chat_lm = GenerativeLM(weights=str(tiny_chat_lm))  # its own copy: InstructionTuning adds LoRA layers
    tuning = InstructionTuning(chat_lm, GenerativeOptions())
    with_context = chat_lm.generate([CHAT], CHAT.max_new_tokens)[0]
    expected = score(CHAT.metric, with_context, CHAT.target, CHAT.choices)
    scored = tuning.score(Batch([CHAT], torch.zeros(1, dtype=torch.long)))
    assert scored.tolist() == [expected]
    # a chat whose answer is what the model writes from the whole chat, but not from its last user turn alone
    alone = chat_lm.generate([CHAT.prompt], CHAT.max_new_tokens)[0]
    assert alone != with_context
    answered = Instruction(CHAT.prompt, with_context, context=CHAT.context, metric="exact_match")
    assert tuning.score(Batch([answered], torch.zeros(1, dtype=torch.long))).tolist() == [1.0]
