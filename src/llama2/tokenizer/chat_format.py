"""The Llama 2 chat format (SPEC §4): the only place in the project that knows `[INST]` and `<<SYS>>`.

Prompts are built segment by segment exactly like Meta's `chat_completion`: each completed
(user, assistant) pair is encoded on its own with BOS and EOS, the last user turn with BOS only. Training
labels come from the same segments, so prompt ids and training ids can never drift apart. An assistant
message with `"weight": 0` (OpenAI's fine-tuning convention) is context only: its labels are -100.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, TypedDict

from llama2.tokenizer.tokenizer import Tokenizer

Role = Literal["system", "user", "assistant"]


class _RoleAndContent(TypedDict):
    role: Role
    content: str


class Message(_RoleAndContent, total=False):
    weight: int
    """Assistant messages only: 1 (the default) trains on the answer, 0 keeps it as context only."""


Dialog = Sequence[Message]

B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"
SPECIAL_TAGS = [B_INST, E_INST, "<<SYS>>", "<</SYS>>"]
UNSAFE_ERROR = "Error: special tags are not allowed as part of the prompt."
IGNORE_INDEX = -100

DEFAULT_SYSTEM_PROMPT = (
    "You are a helpful, respectful and honest assistant. Always answer as helpfully as possible, while being "
    "safe. Your answers should not include any harmful, unethical, racist, sexist, toxic, dangerous, or illegal "
    "content. Please ensure that your responses are socially unbiased and positive in nature.\n\n"
    "If a question does not make any sense, or is not factually coherent, explain why instead of answering "
    "something not correct. If you don't know the answer to a question, please don't share false information."
)


class DialogError(ValueError):
    """A dialog that the chat format cannot encode (wrong roles, empty, special tags)."""


def has_special_tags(dialog: Dialog) -> bool:
    return any(tag in msg["content"] for tag in SPECIAL_TAGS for msg in dialog)


def is_valid_weight(role: str, weight: object) -> bool:
    """A message's `weight`: 0 or 1 (not a bool), on an assistant message only."""
    return role == "assistant" and weight in (0, 1) and not isinstance(weight, bool)


def _validate(dialog: Dialog, must_end_with: Role) -> list[Message]:
    if not isinstance(dialog, Sequence) or isinstance(dialog, str) or len(dialog) == 0:
        raise DialogError("a dialog must be a non-empty list of {'role', 'content'} messages")
    for i, msg in enumerate(dialog):
        if not isinstance(msg, dict) or "role" not in msg or "content" not in msg:
            raise DialogError(f"message {i}: expected a dict with 'role' and 'content', got {msg!r}")
        if msg["role"] not in ("system", "user", "assistant"):
            raise DialogError(f"message {i}: unknown role {msg['role']!r} (expected system, user or assistant)")
        if not isinstance(msg["content"], str):
            raise DialogError(f"message {i}: content must be a string, got {type(msg['content']).__name__}")
        if "weight" in msg and not is_valid_weight(msg["role"], msg["weight"]):
            raise DialogError(f"message {i}: 'weight' is 0 or 1 on an assistant message, got {msg['weight']!r} "
                              f"on a {msg['role']} message")
    if has_special_tags(dialog):
        raise DialogError(UNSAFE_ERROR)
    messages = list(dialog)
    if messages[0]["role"] == "system":
        if len(messages) < 2:
            raise DialogError("a dialog with a system message needs a user message after it")
        merged = B_SYS + messages[0]["content"] + E_SYS + messages[1]["content"]
        messages = [{"role": messages[1]["role"], "content": merged}] + messages[2:]
    for i, msg in enumerate(messages):
        expected = "user" if i % 2 == 0 else "assistant"
        if msg["role"] != expected:
            raise DialogError(
                f"roles must alternate user/assistant/user/... after an optional system message; "
                f"turn {i} is {msg['role']!r}, expected {expected!r}"
            )
    if messages[-1]["role"] != must_end_with:
        raise DialogError(f"the dialog must end with a {must_end_with} message, not {messages[-1]['role']!r}")
    return messages


def _user_text(content: str) -> str:
    return f"{B_INST} {content.strip()} {E_INST}"


def encode_dialog(tokenizer: Tokenizer, dialog: Dialog) -> list[int]:
    """Prompt ids for a dialog that ends with a user turn, identical to Meta's `chat_completion`."""
    messages = _validate(dialog, must_end_with="user")
    ids: list[int] = []
    for user, answer in zip(messages[:-1:2], messages[1::2], strict=True):
        ids += tokenizer.encode(f"{_user_text(user['content'])} {answer['content'].strip()} ", bos=True, eos=True)
    ids += tokenizer.encode(_user_text(messages[-1]["content"]), bos=True, eos=False)
    return ids


def encode_dialog_turns(tokenizer: Tokenizer, dialog: Dialog) -> list[tuple[list[int], list[int]]]:
    """`(ids, labels)` of each (user, assistant) turn of a dialog that ends with an assistant turn.

    A turn is `<s>[INST] user [/INST]` (labels -100) followed by `answer </s>` (labels = ids, or -100 when
    the answer has `"weight": 0`), the llama-recipes construction. Packing cuts dialogs only between turns.
    """
    messages = _validate(dialog, must_end_with="assistant")
    turns = []
    for user, answer in zip(messages[::2], messages[1::2], strict=True):
        prompt = tokenizer.encode(_user_text(user["content"]), bos=True, eos=False)
        reply = tokenizer.encode(f"{answer['content'].strip()} ", bos=False, eos=True)
        answer_labels = reply if answer.get("weight", 1) == 1 else [IGNORE_INDEX] * len(reply)
        turns.append((prompt + reply, [IGNORE_INDEX] * len(prompt) + answer_labels))
    return turns


def encode_dialog_for_training(tokenizer: Tokenizer, dialog: Dialog) -> tuple[list[int], list[int]]:
    """`(ids, labels)` for a dialog that ends with an assistant turn: its turns (`encode_dialog_turns`) joined.

    Labels are -100 on system and user tokens (and on answers of weight 0); the
    concatenated ids equal `encode_dialog` on the dialog's prefixes, turn by turn.
    """
    ids: list[int] = []
    labels: list[int] = []
    for turn_ids, turn_labels in encode_dialog_turns(tokenizer, dialog):
        ids += turn_ids
        labels += turn_labels
    return ids, labels
