"""Readers and validators for the project's data files (DESIGN §4 "Files").

Three kinds of file:

- **chat** jsonl: one `{"messages": [{"role", "content"}, ...]}` a line. Roles are an optional `system`
  message, then `user`/`assistant` alternating from `user`. SFT data ends with an assistant turn; prompt
  sets (evaluation, RLHF prompts) end with a user turn; both are valid chat files. Extra keys (`id`, `meta`)
  are kept in `ChatRecord.meta`. An assistant message may carry `"weight": 0` (OpenAI's fine-tuning
  convention): it stays in the dialog as context and is not trained on.
- **preference** jsonl: native `{"prompt": [messages], "chosen", "rejected", "rating", "safety"?}`, or
  Anthropic HH transcripts (`{"chosen": "\\n\\nHuman: ...\\n\\nAssistant: ...", "rejected": ...}`, usually
  gzipped), which are cut at their last `Assistant:` turn into a prompt dialog and two responses.
- **text**: `.txt` (documents separated by blank lines) or jsonl with a `text` field (one document a line).

Every problem raises (or, when validating, collects) a `FormatError` that names the file, the line, the
field and what was expected, so a bad line in a million-line file is found at once.
"""

from __future__ import annotations

import gzip
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypedDict

from llama2.tokenizer.chat_format import Message, Role, is_valid_weight

Rating = Literal["significantly_better", "better", "slightly_better", "negligibly_better"]
RATINGS: tuple[str, ...] = ("significantly_better", "better", "slightly_better", "negligibly_better")
KINDS = ("chat", "preference", "text")
MAX_LINE_CHARS = 1_000_000  # a longer line is almost surely a broken file (missing newlines), not a record


class SafetyLabel(TypedDict):
    chosen_safe: bool
    rejected_safe: bool


class FormatError(ValueError):
    """One bad record: `file:line: field: what is wrong (expected ...)`."""

    def __init__(self, path: str | Path, line: int, field_name: str, message: str):
        self.path, self.line, self.field, self.message = str(path), line, field_name, message
        super().__init__(f"{path}:{line}: {field_name}: {message}")


@dataclass
class ChatRecord:
    messages: list[Message]
    meta: dict[str, Any] = field(default_factory=dict)
    line: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"messages": list(self.messages), **self.meta}


@dataclass
class PreferenceRecord:
    """A prompt dialog (ending with a user turn) and two responses, `chosen` preferred over `rejected`.

    `rating` is None for sources without one (Anthropic HH). `notes` records quirks of the source that a
    consumer may want to filter: "identical" (chosen == rejected), "empty_chosen"/"empty_rejected",
    "prefix_mismatch" (HH transcripts whose contexts differ; the chosen one's context is kept),
    "repaired_turns" (an HH turn marker without its blank line, split where `Human:` appears; or two final
    Assistant turns in a row, joined into the response).
    """

    prompt: list[Message]
    chosen: str
    rejected: str
    rating: Rating | None = None
    safety: SafetyLabel | None = None
    notes: tuple[str, ...] = ()
    line: int = 0

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"prompt": list(self.prompt), "chosen": self.chosen, "rejected": self.rejected}
        if self.rating is not None:
            out["rating"] = self.rating
        if self.safety is not None:
            out["safety"] = dict(self.safety)
        return out


@dataclass
class TextRecord:
    text: str
    line: int = 0


def dumps(record: dict[str, Any]) -> str:
    """The one jsonl serialisation we write: UTF-8 text, stable key order, so files are byte-reproducible."""
    return json.dumps(record, ensure_ascii=False)


def write_chat(path: str | Path, dialogs: list[list[Message]]) -> None:
    """`dialogs` as a chat jsonl file (`{"messages": [...]}` a line), the form `read_chat` reads back."""
    Path(path).write_text("".join(dumps({"messages": d}) + "\n" for d in dialogs))


# --------------------------------------------------------------------------------------------------- lines


def _open_text(path: Path):
    if path.suffix == ".gz":
        return gzip.open(path, "rb")
    return path.open("rb")


def _raw_lines(path: str | Path) -> Iterator[tuple[int, str | FormatError]]:
    """(line number, decoded line or the FormatError for that line) for non-blank lines.

    Errors are yielded rather than raised so that validation can report them and read on.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"data file not found: {p}")
    with _open_text(p) as f:
        for n, raw in enumerate(f, 1):
            if len(raw) > MAX_LINE_CHARS:
                yield n, FormatError(p, n, "line", f"{len(raw)} bytes long (expected at most {MAX_LINE_CHARS})")
                continue
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield n, FormatError(p, n, "line", f"invalid UTF-8 at byte {exc.start} (expected UTF-8 text)")
                continue
            if line.strip():
                yield n, line


def _iter_lines(path: str | Path) -> Iterator[tuple[int, str]]:
    for n, line in _raw_lines(path):
        if isinstance(line, FormatError):
            raise line
        yield n, line


def _json_object(path: Path, n: int, line: str) -> dict[str, Any]:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise FormatError(path, n, "line", f"invalid JSON ({exc.msg} at column {exc.colno}; expected one JSON "
                          "object per line)") from None
    if not isinstance(obj, dict):
        raise FormatError(path, n, "line", f"a JSON {type(obj).__name__} (expected a JSON object)")
    return obj


def _require(path: Path, n: int, obj: dict[str, Any], key: str, kind: type, what: str) -> Any:
    if key not in obj:
        raise FormatError(path, n, key, f"missing (expected {what})")
    value = obj[key]
    if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)):
        raise FormatError(path, n, key, f"got {type(value).__name__} (expected {what})")
    return value


def _messages(path: Path, n: int, value: Any, name: str, last_role: str | None) -> list[Message]:
    """Check a message list: dicts with role/content strings, non-empty content, roles in chat order."""
    if not isinstance(value, list) or not value:
        raise FormatError(path, n, name, "expected a non-empty list of {'role', 'content'} messages")
    out: list[Message] = []
    for i, msg in enumerate(value):
        where = f"{name}[{i}]"
        if not isinstance(msg, dict):
            raise FormatError(path, n, where, f"got {type(msg).__name__} (expected an object)")
        role = msg.get("role")
        if role not in ("system", "user", "assistant"):
            raise FormatError(path, n, f"{where}.role", f"got {role!r} (expected 'system', 'user' or 'assistant')")
        content = msg.get("content")
        if not isinstance(content, str):
            raise FormatError(path, n, f"{where}.content", f"got {type(content).__name__} (expected a string)")
        if not content.strip():
            raise FormatError(path, n, f"{where}.content", "empty (expected non-empty text)")
        message: Message = {"role": role, "content": content}
        if "weight" in msg:
            weight = msg["weight"]
            if not is_valid_weight(role, weight):
                raise FormatError(path, n, f"{where}.weight", f"got {weight!r} on a {role} message (expected 0 or "
                                  "1, on assistant messages only)")
            message["weight"] = weight
        out.append(message)
    start = 1 if out[0]["role"] == "system" else 0
    for i in range(start, len(out)):
        expected = "user" if (i - start) % 2 == 0 else "assistant"
        if out[i]["role"] != expected:
            raise FormatError(
                path, n, f"{name}[{i}].role",
                f"got {out[i]['role']!r} (expected {expected!r}: an optional system message, then user and "
                "assistant turns alternating from user)",
            )
    if start == len(out):
        raise FormatError(path, n, name, "only a system message (expected at least one user turn)")
    if last_role is not None and out[-1]["role"] != last_role:
        raise FormatError(path, n, f"{name}[{len(out) - 1}].role", f"got {out[-1]['role']!r} (expected the "
                          f"list to end with a {last_role} turn)")
    return out


# ---------------------------------------------------------------------------------------------------- chat


def parse_chat(path: str | Path, n: int, line: str, last_role: str | None = None) -> ChatRecord:
    p = Path(path)
    obj = _json_object(p, n, line)
    if "messages" not in obj:
        raise FormatError(p, n, "messages", "missing (expected a list of {'role', 'content'} messages)")
    messages = _messages(p, n, obj["messages"], "messages", last_role)
    return ChatRecord(messages, {k: v for k, v in obj.items() if k != "messages"}, n)


def iter_chat(path: str | Path, last_role: str | None = None) -> Iterator[ChatRecord]:
    """Chat records; `last_role="assistant"` for SFT data, `"user"` for prompt sets, None for either."""
    for n, line in _iter_lines(path):
        yield parse_chat(path, n, line, last_role)


def read_chat(path: str | Path, last_role: str | None = None) -> list[ChatRecord]:
    return list(iter_chat(path, last_role))


# ---------------------------------------------------------------------------------------------- preference


def parse_preference(path: str | Path, n: int, line: str) -> PreferenceRecord:
    """A native preference record, or an HH transcript pair when the record has no `prompt` field."""
    p = Path(path)
    obj = _json_object(p, n, line)
    if "prompt" not in obj and isinstance(obj.get("chosen"), str) and "Human:" in obj["chosen"]:
        return parse_hh(p, n, obj)
    if "prompt" not in obj:
        raise FormatError(p, n, "prompt", "missing (expected a list of messages ending with a user turn, or an "
                          "Anthropic HH record whose 'chosen' transcript contains 'Human:')")
    prompt = _messages(p, n, obj["prompt"], "prompt", "user")
    chosen = _require(p, n, obj, "chosen", str, "the preferred response as a string")
    rejected = _require(p, n, obj, "rejected", str, "the other response as a string")
    for key, text in (("chosen", chosen), ("rejected", rejected)):
        if not text.strip():
            raise FormatError(p, n, key, "empty (expected a non-empty response)")
    rating = obj.get("rating")
    if rating not in RATINGS:
        raise FormatError(p, n, "rating", f"got {rating!r} (expected one of {', '.join(RATINGS)})")
    safety = None
    if "safety" in obj:
        s = obj["safety"]
        if not isinstance(s, dict):
            raise FormatError(p, n, "safety", f"got {type(s).__name__} (expected an object with chosen_safe "
                              "and rejected_safe booleans)")
        safety = SafetyLabel(
            chosen_safe=_require(p, n, s, "chosen_safe", bool, "true or false"),
            rejected_safe=_require(p, n, s, "rejected_safe", bool, "true or false"),
        )
        if not safety["chosen_safe"] and safety["rejected_safe"]:
            raise FormatError(p, n, "safety", "chosen is unsafe but rejected is safe (such pairs are excluded, "
                              "SPEC §6; expected chosen_safe or both unsafe)")
    notes = ("identical",) if chosen == rejected else ()
    return PreferenceRecord(prompt, chosen, rejected, rating, safety, notes, n)


_HH_TURN = re.compile(r"\n\n(Human|Assistant):[ ]?")


def hh_transcript_to_messages(text: str) -> list[Message]:
    """Split an HH transcript into messages; consecutive turns of one speaker are merged (HH has a few)."""
    parts = _HH_TURN.split(text)
    if parts[0].strip():
        raise ValueError("text before the first 'Human:' turn")
    messages: list[Message] = []
    for speaker, content in zip(parts[1::2], parts[2::2], strict=True):
        role: Role = "user" if speaker == "Human" else "assistant"
        if messages and messages[-1]["role"] == role:
            messages[-1] = {"role": role, "content": messages[-1]["content"] + "\n\n" + content}
        else:
            messages.append({"role": role, "content": content})
    return messages


def _hh_split(path: Path, n: int, key: str, text: str) -> tuple[list[Message], str, bool]:
    cut = text.rfind("\n\nAssistant:")
    if cut < 0:
        raise FormatError(path, n, key, "no '\\n\\nAssistant:' turn (expected an HH transcript "
                          "'\\n\\nHuman: ...\\n\\nAssistant: ...')")
    response = text[cut + len("\n\nAssistant:"):].strip()
    try:
        prompt = hh_transcript_to_messages(text[:cut])
    except ValueError as exc:
        raise FormatError(path, n, key, f"{exc} (expected the transcript to start with '\\n\\nHuman:')") from None
    repaired = False
    if prompt and prompt[-1]["role"] == "assistant" and "Human:" in prompt[-1]["content"]:
        # A few HH transcripts lost the blank line before a Human turn ("... kings.  Human: Then how ...").
        head, _, tail = prompt[-1]["content"].rpartition("Human:")
        prompt[-1:] = [{"role": "assistant", "content": head.rstrip()}, {"role": "user", "content": tail.strip()}]
        repaired = True
    elif prompt and prompt[-1]["role"] == "assistant":
        # Two Assistant turns in a row at the end: both belong to the response being compared.
        response = (prompt.pop()["content"].strip() + "\n\n" + response).strip()
        repaired = True
    if not prompt or prompt[0]["role"] != "user" or prompt[-1]["role"] != "user":
        raise FormatError(path, n, key, "turns out of order (expected the context before the last Assistant "
                          "turn to start and end with a Human turn)")
    return prompt, response, repaired


def parse_hh(path: str | Path, n: int, obj: dict[str, Any]) -> PreferenceRecord:
    p = Path(path)
    chosen_text = _require(p, n, obj, "chosen", str, "an HH transcript string")
    rejected_text = _require(p, n, obj, "rejected", str, "an HH transcript string")
    prompt, chosen, repaired = _hh_split(p, n, "chosen", chosen_text)
    other_prompt, rejected, other_repaired = _hh_split(p, n, "rejected", rejected_text)
    notes = ["repaired_turns"] if repaired or other_repaired else []
    if other_prompt != prompt:
        notes.append("prefix_mismatch")
    if chosen_text == rejected_text:
        notes.append("identical")
    if not chosen:
        notes.append("empty_chosen")
    if not rejected:
        notes.append("empty_rejected")
    return PreferenceRecord(prompt, chosen, rejected, None, None, tuple(notes), n)


def iter_preferences(path: str | Path) -> Iterator[PreferenceRecord]:
    """Native preference records or HH transcripts (plain or gzipped), detected per record."""
    for n, line in _iter_lines(path):
        yield parse_preference(path, n, line)


def read_preferences(path: str | Path) -> list[PreferenceRecord]:
    return list(iter_preferences(path))


# ---------------------------------------------------------------------------------------------------- text


def iter_text(path: str | Path) -> Iterator[TextRecord]:
    """Documents: jsonl `text` fields (one a line) or, for other files, blocks separated by blank lines."""
    p = Path(path)
    if p.name.endswith((".jsonl", ".jsonl.gz")):
        for n, line in _iter_lines(p):
            obj = _json_object(p, n, line)
            text = _require(p, n, obj, "text", str, "the document as a string")
            if not text.strip():
                raise FormatError(p, n, "text", "empty (expected non-empty text)")
            yield TextRecord(text, n)
        return
    block: list[str] = []
    start = 0
    for n, line in _iter_lines_with_blanks(p):
        if line.strip():
            if not block:
                start = n
            block.append(line.rstrip("\n"))
        elif block:
            yield TextRecord("\n".join(block), start)
            block = []
    if block:
        yield TextRecord("\n".join(block), start)


def _iter_lines_with_blanks(path: Path) -> Iterator[tuple[int, str]]:
    last = 0
    for n, line in _iter_lines(path):
        if n > last + 1:
            yield n - 1, ""  # one blank marker is enough to end a document
        yield n, line
        last = n


def read_text(path: str | Path) -> list[TextRecord]:
    return list(iter_text(path))


# ------------------------------------------------------------------------------------------------ validate


@dataclass
class ValidationReport:
    path: str
    kind: str
    records: int = 0
    errors: list[FormatError] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)
    lengths: dict[str, dict[str, float]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.errors and self.records > 0


def _stats(values: list[int]) -> dict[str, float]:
    if not values:
        return {"min": 0, "mean": 0.0, "max": 0}
    return {"min": min(values), "mean": round(sum(values) / len(values), 1), "max": max(values)}


def validate_file(path: str | Path, kind: str, max_errors: int = 50) -> ValidationReport:
    """Read a whole file, collecting up to `max_errors` errors instead of stopping at the first."""
    if kind not in KINDS:
        raise ValueError(f"unknown data kind {kind!r} (expected one of {', '.join(KINDS)})")
    p = Path(path)
    report = ValidationReport(str(p), kind)
    counts: dict[str, int] = {}
    lengths: dict[str, list[int]] = {}

    def add(name: str, value: int) -> None:
        lengths.setdefault(name, []).append(value)

    def bump(name: str) -> None:
        counts[name] = counts.get(name, 0) + 1

    if kind == "text" and not p.name.endswith((".jsonl", ".jsonl.gz")):
        try:
            for rec in iter_text(p):
                report.records += 1
                add("chars", len(rec.text))
        except FormatError as exc:
            report.errors.append(exc)
    else:
        for n, line in _raw_lines(p):
            if len(report.errors) >= max_errors:
                break
            try:
                if isinstance(line, FormatError):
                    raise line
                _validate_one(p, n, line, kind, add, bump)
                report.records += 1
            except FormatError as exc:
                report.errors.append(exc)
    report.counts = counts
    report.lengths = {k: _stats(v) for k, v in lengths.items()}
    return report


def _validate_one(path: Path, n: int, line: str, kind: str, add, bump) -> None:
    if kind == "chat":
        rec = parse_chat(path, n, line)
        add("user_turns", sum(m["role"] == "user" for m in rec.messages))
        add("chars", sum(len(m["content"]) for m in rec.messages))
        bump("ends_with_" + rec.messages[-1]["role"])
        if rec.messages[0]["role"] == "system":
            bump("with_system")
    elif kind == "preference":
        rec = parse_preference(path, n, line)
        add("prompt_turns", sum(m["role"] == "user" for m in rec.prompt))
        add("chosen_chars", len(rec.chosen))
        add("rejected_chars", len(rec.rejected))
        bump(rec.rating or "unrated")
        if rec.safety is not None:
            bump(f"safety_chosen_{'safe' if rec.safety['chosen_safe'] else 'unsafe'}"
                 f"_rejected_{'safe' if rec.safety['rejected_safe'] else 'unsafe'}")
        for note in rec.notes:
            bump(note)
    else:
        obj = _json_object(path, n, line)
        text = _require(path, n, obj, "text", str, "the document as a string")
        if not text.strip():
            raise FormatError(path, n, "text", "empty (expected non-empty text)")
        add("chars", len(text))
