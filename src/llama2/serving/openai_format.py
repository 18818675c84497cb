"""The JSON objects of OpenAI's chat and text completion APIs (whole replies and stream chunks)."""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

from llama2.serving.engine import Finished


@dataclass(frozen=True)
class ReplyMeta:
    """What every object of one reply shares."""

    kind: str
    """"chat" or "text"."""
    model: str
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created: int = field(default_factory=lambda: int(time.time()))

    def envelope(self, stream: bool) -> dict[str, Any]:
        if self.kind == "chat":
            obj, prefix = ("chat.completion.chunk" if stream else "chat.completion"), "chatcmpl-"
        else:
            obj, prefix = "text_completion", "cmpl-"
        return {"id": prefix + self.id, "object": obj, "created": self.created, "model": self.model}


def usage(prompt_tokens: int, finished: list[Finished]) -> dict[str, int]:
    """Prompt tokens once per prompt (as OpenAI counts for `n` > 1), completion tokens summed over choices."""
    completion = sum(f.completion_tokens for f in finished)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
            "total_tokens": prompt_tokens + completion}


def reply(meta: ReplyMeta, texts: list[str], reasons: list[str], usage_counts: dict[str, int]) -> dict[str, Any]:
    choices = []
    for i, (text, reason) in enumerate(zip(texts, reasons, strict=True)):
        body = {"message": {"role": "assistant", "content": text}} if meta.kind == "chat" else {"text": text}
        choices.append({"index": i, **body, "logprobs": None, "finish_reason": reason})
    return {**meta.envelope(stream=False), "choices": choices, "usage": usage_counts}


def chunk(meta: ReplyMeta, index: int, text: str | None = None, reason: str | None = None,
          role: bool = False) -> dict[str, Any]:
    """One streamed increment of choice `index`: text, the opening role (chat), or the finish reason."""
    if meta.kind == "chat":
        delta: dict[str, Any] = {"role": "assistant", "content": ""} if role else {}
        if text is not None:
            delta["content"] = text
        choice = {"index": index, "delta": delta}
    else:
        choice = {"index": index, "text": text or ""}
    return {**meta.envelope(stream=True), "choices": [{**choice, "logprobs": None, "finish_reason": reason}]}


def usage_chunk(meta: ReplyMeta, usage_counts: dict[str, int]) -> dict[str, Any]:
    return {**meta.envelope(stream=True), "choices": [], "usage": usage_counts}


def sse(obj: dict[str, Any] | str) -> str:
    """A server-sent event line; `[DONE]` ends OpenAI streams."""
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n"
