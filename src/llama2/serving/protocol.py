"""Parse and check OpenAI request bodies by hand, so every mistake gets an OpenAI-style 400 naming the field.

Unknown fields are ignored (clients send many optional ones), but fields that would change the answer
and that we cannot honour (tools, logprobs, penalties, ...) are refused rather than silently dropped.
Defaults for temperature and top-p are Llama 2's (0.6 and 0.9, SPEC §4), not OpenAI's 1.0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from llama2.serving.errors import invalid

ROLES = ("system", "user", "assistant")
MAX_STOPS = 4
UNSUPPORTED = ("tools", "functions", "tool_choice", "logprobs", "top_logprobs", "logit_bias", "echo", "suffix",
               "frequency_penalty", "presence_penalty")


@dataclass(frozen=True)
class Sampling:
    """The generation settings shared by chat and text completions."""

    max_tokens: int | None
    """None: up to the end of the model's context."""
    temperature: float
    top_p: float
    n: int
    stop: tuple[str, ...]
    seed: int | None
    stream: bool
    include_usage: bool
    """`stream_options.include_usage`: send a last chunk with token counts."""


@dataclass(frozen=True)
class ChatRequest:
    model: str
    messages: list[dict[str, str]]
    sampling: Sampling


@dataclass(frozen=True)
class CompletionRequest:
    model: str
    prompts: list[str]
    sampling: Sampling


def _kind(value: Any) -> str:
    return "null" if value is None else {bool: "boolean", int: "integer", float: "number", str: "string",
                                         list: "array", dict: "object"}.get(type(value), type(value).__name__)


def _number(body: dict, key: str, default: float, low: float, high: float, low_open: bool = False) -> float:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise invalid(f"'{key}' must be a number, got {_kind(value)}", key, "invalid_type")
    if value > high or value < low or (low_open and value == low):
        bounds = f"({low}, {high}]" if low_open else f"[{low}, {high}]"
        raise invalid(f"'{key}' must be in {bounds}, got {value}", key, "invalid_value")
    return float(value)


def _integer(body: dict, key: str, low: int, high: int | None = None) -> int | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise invalid(f"'{key}' must be an integer, got {_kind(value)}", key, "invalid_type")
    if value < low or (high is not None and value > high):
        raise invalid(f"'{key}' must be at least {low}" + (f" and at most {high}" if high else "") + f", got {value}",
                      key, "invalid_value")
    return value


def _boolean(body: dict, key: str) -> bool:
    value = body.get(key, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise invalid(f"'{key}' must be a boolean, got {_kind(value)}", key, "invalid_type")
    return value


def _stops(body: dict) -> tuple[str, ...]:
    value = body.get("stop")
    if value is None:
        return ()
    stops = [value] if isinstance(value, str) else value
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise invalid(f"'stop' must be a string or an array of strings, got {_kind(value)}", "stop", "invalid_type")
    if len(stops) > MAX_STOPS or any(s == "" for s in stops):
        raise invalid(f"'stop' takes at most {MAX_STOPS} non-empty strings", "stop", "invalid_value")
    return tuple(stops)


def _sampling(body: dict, max_n: int) -> Sampling:
    for key in UNSUPPORTED:
        if body.get(key):
            raise invalid(f"'{key}' is not supported by this server", key, "unsupported_parameter")
    max_tokens = _integer(body, "max_tokens", 1)
    if max_tokens is None:
        max_tokens = _integer(body, "max_completion_tokens", 1)
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise invalid(f"'stream_options' must be an object, got {_kind(options)}", "stream_options", "invalid_type")
    return Sampling(
        max_tokens=max_tokens,
        temperature=_number(body, "temperature", 0.6, 0.0, 2.0),
        top_p=_number(body, "top_p", 0.9, 0.0, 1.0, low_open=True),
        n=_integer(body, "n", 1, max_n) or 1,
        stop=_stops(body),
        seed=_integer(body, "seed", 0, 2**63 - 1 - max_n),  # choice i uses seed + i; torch takes < 2**64
        stream=_boolean(body, "stream"),
        include_usage=_boolean(options or {}, "include_usage"),
    )


def _model(body: dict) -> str:
    model = body.get("model")
    if not isinstance(model, str):
        raise invalid(f"'model' must be a string, got {_kind(model)}", "model", "invalid_type")
    return model


def _object(body: Any) -> dict:
    if not isinstance(body, dict):
        raise invalid(f"the request body must be a JSON object, got {_kind(body)}", None, "invalid_type")
    return body


def _content(content: Any, param: str) -> str:
    """A message's text: a string, or an array of `{"type": "text", "text": ...}` parts (newer clients)."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise invalid(f"{param}[{j}]: only text parts are supported", f"{param}[{j}]", "invalid_value")
            parts.append(part["text"])
        return "".join(parts)
    raise invalid(f"'{param}' must be a string or an array of text parts, got {_kind(content)}", param, "invalid_type")


def parse_chat(body: Any, max_n: int) -> ChatRequest:
    body = _object(body)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise invalid("'messages' must be a non-empty array of {role, content} objects", "messages", "invalid_type")
    parsed = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise invalid(f"messages[{i}] must be an object, got {_kind(msg)}", f"messages[{i}]", "invalid_type")
        role = msg.get("role")
        if role not in ROLES:
            raise invalid(f"messages[{i}].role must be one of {', '.join(ROLES)}, got {role!r}",
                          f"messages[{i}].role", "invalid_value")
        parsed.append({"role": role, "content": _content(msg.get("content"), f"messages[{i}].content")})
    return ChatRequest(_model(body), parsed, _sampling(body, max_n))


def parse_completion(body: Any, max_n: int) -> CompletionRequest:
    body = _object(body)
    prompt = body.get("prompt")
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, list) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise invalid(f"'prompt' must be a string or a non-empty array of strings, got {_kind(prompt)}",
                      "prompt", "invalid_type")
    sampling = _sampling(body, max_n)
    if len(prompts) * sampling.n > max_n:
        raise invalid(f"at most {max_n} completions per request (prompts × n)", "n", "invalid_value")
    return CompletionRequest(_model(body), prompts, sampling)
