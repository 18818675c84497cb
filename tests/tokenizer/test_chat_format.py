"""The chat format against a straight re-implementation of Meta's `chat_completion`, with the real tokenizer."""

import pytest

from llama2 import Tokenizer, encode_dialog, encode_dialog_for_training
from llama2.tokenizer.chat_format import IGNORE_INDEX, UNSAFE_ERROR, DialogError

B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"


def meta_prompt_tokens(tok, dialog):
    """facebookresearch/llama `chat_completion`, transcribed from SPEC §4."""
    if dialog[0]["role"] == "system":
        first = {"role": dialog[1]["role"], "content": B_SYS + dialog[0]["content"] + E_SYS + dialog[1]["content"]}
        dialog = [first] + list(dialog[2:])
    tokens = []
    for prompt, answer in zip(dialog[::2], dialog[1::2], strict=False):
        tokens += tok.encode(f"{B_INST} {prompt['content'].strip()} {E_INST} {answer['content'].strip()} ",
                             bos=True, eos=True)
    tokens += tok.encode(f"{B_INST} {dialog[-1]['content'].strip()} {E_INST}", bos=True, eos=False)
    return tokens


def merged(dialog):
    if dialog[0]["role"] != "system":
        return list(dialog)
    first = B_SYS + dialog[0]["content"] + E_SYS + dialog[1]["content"]
    return [{"role": "user", "content": first}] + list(dialog[2:])


def u(s):
    return {"role": "user", "content": s}


def a(s):
    return {"role": "assistant", "content": s}


def s(x):
    return {"role": "system", "content": x}


DIALOGS = [
    [u("what is the recipe of mayonnaise?")],
    [s("Always answer with Haiku"), u("I am going to Paris, what should I see?")],
    [u("  leading and trailing white space \n"), a("  An answer with spaces.  "), u("\tand a follow-up?\n")],
    [s("Réponds en français. 🙂"), u("Ünïcödé: naïve café, 日本語"), a("D'accord — très bien."), u("encore ?")],
    [u("What is 1234 + 5678?"), a("1234 + 5678 = 6912"), u("and 99 * 101?"), a("9999"), u("thanks, 3.14159?")],
    [s("  system with edge spaces  "), u("hi"), a("hello"), u("bye")],
    [u("multi\nline\nprompt"), a("multi\nline\nanswer"), u("x")],
]


@pytest.fixture(scope="module")
def tok(llama2_tokenizer_path):
    return Tokenizer(llama2_tokenizer_path)


def test_real_tokenizer_ids(tok):
    assert (tok.n_words, tok.bos_id, tok.eos_id, tok.pad_id) == (32000, 1, 2, -1)
    assert tok.encode("Hello world", bos=True, eos=True) == [1, 15043, 3186, 2]


@pytest.mark.parametrize("dialog", DIALOGS, ids=range(len(DIALOGS)))
def test_encode_dialog_equals_meta(tok, dialog):
    assert encode_dialog(tok, dialog) == meta_prompt_tokens(tok, dialog)


def test_rendered_text_of_a_system_dialog(tok):
    ids = encode_dialog(tok, [s("S"), u("U1"), a("A1"), u("U2")])
    assert ids.count(tok.bos_id) == 2 and ids.count(tok.eos_id) == 1
    first = ids[: ids.index(tok.eos_id) + 1]
    assert tok.decode(first[1:-1]) == "[INST] <<SYS>>\nS\n<</SYS>>\n\nU1 [/INST] A1 "  # the trailing space before EOS
    assert tok.decode(ids[ids.index(tok.eos_id) + 2 :]) == "[INST] U2 [/INST]"


@pytest.mark.parametrize("dialog", DIALOGS, ids=range(len(DIALOGS)))
def test_training_labels_segment_by_segment(tok, dialog):
    """Every completed pair encodes like Meta's joint string; user spans are -100, answers and EOS trained."""
    full = list(dialog) + [a(" final answer 42 ")]
    ids, labels = encode_dialog_for_training(tok, full)
    msgs = merged(full)
    expected_ids, expected_labels = [], []
    for prompt, answer in zip(msgs[::2], msgs[1::2], strict=True):
        joint = tok.encode(f"{B_INST} {prompt['content'].strip()} {E_INST} {answer['content'].strip()} ",
                           bos=True, eos=True)
        n_prompt = len(tok.encode(f"{B_INST} {prompt['content'].strip()} {E_INST}", bos=True, eos=False))
        expected_ids += joint
        expected_labels += [IGNORE_INDEX] * n_prompt + joint[n_prompt:]
    assert ids == expected_ids
    assert labels == expected_labels
    assert labels[-1] == tok.eos_id
    # The prompt for the last answer is exactly what inference would send.
    prefix = encode_dialog(tok, full[:-1])
    assert ids[: len(prefix)] == prefix


def test_an_answer_of_weight_0_is_context_only(tok):
    dialog = [s("Speak like a pirate"), u("hi"), {**a("ahoy"), "weight": 0}, u("how are you"), a("arr, fine")]
    ids, labels = encode_dialog_for_training(tok, dialog)
    trained = [i for i, l in zip(ids, labels, strict=True) if l != IGNORE_INDEX]
    assert trained == tok.encode("arr, fine ", bos=False, eos=True)
    _, all_labels = encode_dialog_for_training(tok, [dict(m, weight=1) if m["role"] == "assistant" else m
                                                     for m in dialog])
    assert sum(l != IGNORE_INDEX for l in all_labels) > len(trained)
    assert ids == encode_dialog_for_training(tok, [{k: v for k, v in m.items() if k != "weight"} for m in dialog])[0]


@pytest.mark.parametrize(
    ("dialog", "message"),
    [
        ([], "non-empty"),
        ([a("hi")], "turn 0 is 'assistant'"),
        ([u("a"), u("b")], "turn 1 is 'user'"),
        ([s("x")], "needs a user message"),
        ([u("a"), a("b")], "must end with a user"),
        ([{"role": "tool", "content": "x"}], "unknown role 'tool'"),
        ([{"role": "user"}], "'role' and 'content'"),
        ([{**u("a"), "weight": 0}], "'weight' is 0 or 1 on an assistant message"),
        ([u("a"), {**a("b"), "weight": 2}, u("c")], "'weight' is 0 or 1 on an assistant message"),
        ([u("hello [INST] there")], UNSAFE_ERROR),
        ([s("<<SYS>>"), u("hi")], UNSAFE_ERROR),
        ([u("x"), a("[/INST]"), u("y")], UNSAFE_ERROR),
    ],
)
def test_bad_dialogs_are_refused(tok, dialog, message):
    with pytest.raises(DialogError, match=message.replace("[", r"\[").replace(".", r"\.")):
        encode_dialog(tok, dialog)


def test_training_dialog_must_end_with_an_answer(tok):
    with pytest.raises(DialogError, match="must end with a assistant"):
        encode_dialog_for_training(tok, [u("hi")])
