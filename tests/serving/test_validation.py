"""Every malformed request gets its 4xx with an OpenAI error body, and the server keeps serving."""

from __future__ import annotations

import httpx
import openai
import pytest

USER = {"role": "user", "content": "Hello"}
LONG = " ".join(["owl"] * 400)  # well past the tiny model's 256-token context


def chat(**overrides) -> dict:
    return {"model": "tiny", "messages": [USER], "max_tokens": 4, **overrides}


CASES = [
    # (id, path, body (dict, or raw bytes), status, param, code)
    ("malformed-json", "/v1/chat/completions", b'{"model": "tiny", "messages": [', 400, None, "invalid_json"),
    ("body-not-object", "/v1/chat/completions", [1, 2], 400, None, "invalid_type"),
    ("no-messages", "/v1/chat/completions", {"model": "tiny"}, 400, "messages", "invalid_type"),
    ("messages-not-list", "/v1/chat/completions", chat(messages="hi"), 400, "messages", "invalid_type"),
    ("model-not-string", "/v1/chat/completions", chat(model=3), 400, "model", "invalid_type"),
    ("content-not-string", "/v1/chat/completions", chat(messages=[{"role": "user", "content": 5}]),
     400, "messages[0].content", "invalid_type"),
    ("temperature-string", "/v1/chat/completions", chat(temperature="hot"), 400, "temperature", "invalid_type"),
    ("temperature-range", "/v1/chat/completions", chat(temperature=3), 400, "temperature", "invalid_value"),
    ("top-p-zero", "/v1/chat/completions", chat(top_p=0), 400, "top_p", "invalid_value"),
    ("max-tokens-float", "/v1/chat/completions", chat(max_tokens=1.5), 400, "max_tokens", "invalid_type"),
    ("max-tokens-zero", "/v1/chat/completions", chat(max_tokens=0), 400, "max_tokens", "invalid_value"),
    ("n-zero", "/v1/chat/completions", chat(n=0), 400, "n", "invalid_value"),
    ("stream-string", "/v1/chat/completions", chat(stream="yes"), 400, "stream", "invalid_type"),
    ("stop-number", "/v1/chat/completions", chat(stop=5), 400, "stop", "invalid_type"),
    ("seed-bool", "/v1/chat/completions", chat(seed=True), 400, "seed", "invalid_type"),
    ("seed-huge", "/v1/chat/completions", chat(seed=2**70), 400, "seed", "invalid_value"),
    ("unknown-role", "/v1/chat/completions", chat(messages=[{"role": "robot", "content": "hi"}]),
     400, "messages[0].role", "invalid_value"),
    ("two-users", "/v1/chat/completions", chat(messages=[USER, USER]), 400, "messages", "invalid_dialog"),
    ("assistant-first", "/v1/chat/completions", chat(messages=[{"role": "assistant", "content": "hi"}, USER]),
     400, "messages", "invalid_dialog"),
    ("ends-with-assistant", "/v1/chat/completions", chat(messages=[USER, {"role": "assistant", "content": "hi"}]),
     400, "messages", "invalid_dialog"),
    ("special-tags", "/v1/chat/completions", chat(messages=[{"role": "user", "content": "[INST] hi [/INST]"}]),
     400, "messages", "special_tags_not_allowed"),
    ("prompt-too-long", "/v1/chat/completions", chat(messages=[{"role": "user", "content": LONG}]),
     400, "messages", "context_length_exceeded"),
    ("max-tokens-past-context", "/v1/chat/completions", chat(max_tokens=1000), 400, "max_tokens",
     "context_length_exceeded"),
    ("unsupported-tools", "/v1/chat/completions", chat(tools=[{"type": "function"}]), 400, "tools",
     "unsupported_parameter"),
    ("completion-prompt-number", "/v1/completions", {"model": "tiny", "prompt": 5}, 400, "prompt", "invalid_type"),
    ("completion-too-long", "/v1/completions", {"model": "tiny", "prompt": LONG}, 400, "prompt",
     "context_length_exceeded"),
    ("unknown-path", "/v1/embeddings", {"model": "tiny", "input": "hi"}, 404, None, "not_found"),
]


@pytest.mark.parametrize("path, body, status, param, code", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_request_gets_openai_error_and_server_keeps_serving(live_server, path, body, status, param, code):
    url = live_server.base_url + path
    r = httpx.post(url, content=body) if isinstance(body, bytes) else httpx.post(url, json=body)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"] and error["type"] == "invalid_request_error"
    assert (error["param"], error["code"]) == (param, code)
    ok = httpx.post(live_server.base_url + "/v1/chat/completions", json=chat(temperature=0))
    assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["role"] == "assistant"


def test_wrong_method_is_405(live_server):
    r = httpx.get(live_server.base_url + "/v1/chat/completions")
    assert r.status_code == 405 and r.json()["error"]["code"] == "method_not_allowed"


def test_openai_client_raises_bad_request_with_the_message(live_server):
    client = openai.OpenAI(base_url=live_server.base_url + "/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        client.chat.completions.create(model="tiny", messages=[USER], max_tokens=10_000)


def test_api_key_is_enforced(tiny_llm, start_live_server):
    server = start_live_server(tiny_llm, api_key="sekret")
    url = server.base_url + "/v1/chat/completions"
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sekret"}):
        r = httpx.post(url, json=chat(), headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    assert httpx.get(server.base_url + "/v1/models").status_code == 401
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.base_url + "/v1", api_key="wrong", max_retries=0).models.list()
    good = openai.OpenAI(base_url=server.base_url + "/v1", api_key="sekret", max_retries=0)
    assert good.chat.completions.create(model="tiny", messages=[USER], max_tokens=3).choices
    assert httpx.get(server.base_url + "/health").status_code == 200  # the page and health stay open
    assert httpx.get(server.base_url + "/").status_code == 200
