"""The official `openai` client against a live server: chat, streaming, completions, models."""

from __future__ import annotations

import openai
import pytest

from llama2 import encode_dialog

DIALOG = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Tell me a story"}]


@pytest.fixture(scope="module")
def client(live_server) -> openai.OpenAI:
    return openai.OpenAI(base_url=live_server.base_url + "/v1", api_key="unused", max_retries=0, timeout=60)


def test_chat_completion_is_the_reference_greedy_reply(client, tiny_llm):
    r = client.chat.completions.create(model="tiny", messages=DIALOG, temperature=0, max_tokens=20)
    expected = tiny_llm.chat_completion([DIALOG], temperature=0, max_gen_len=20)[0]["generation"]["content"]
    assert r.object == "chat.completion" and r.model == "tiny"
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == expected
    assert r.usage.prompt_tokens == len(encode_dialog(tiny_llm.tokenizer, DIALOG))
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert 0 < r.usage.completion_tokens <= 20
    assert r.choices[0].finish_reason == ("length" if r.usage.completion_tokens == 20 else "stop")


def test_streaming_chat_joins_to_the_whole_reply_and_reports_usage(client):
    whole = client.chat.completions.create(model="tiny", messages=DIALOG, temperature=0, max_tokens=20)
    stream = client.chat.completions.create(model="tiny", messages=DIALOG, temperature=0, max_tokens=20,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    deltas = [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(deltas) > 1, "the reply should arrive in several pieces"
    assert "".join(deltas) == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_seeded_sampling_repeats_and_n_choices_differ(client, tiny_llm):
    kwargs = dict(model="tiny", messages=DIALOG, temperature=1.0, top_p=1.0, max_tokens=16, seed=7, n=3)
    a = client.chat.completions.create(**kwargs)
    b = client.chat.completions.create(**kwargs)
    texts = [c.message.content for c in a.choices]
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert texts == [c.message.content for c in b.choices]
    assert len(set(texts)) > 1
    assert a.usage.prompt_tokens == len(encode_dialog(tiny_llm.tokenizer, DIALOG)), "the prompt counts once"
    assert 3 <= a.usage.completion_tokens <= 3 * 16


def test_stop_sequence_cuts_the_reply(client):
    full = client.chat.completions.create(model="tiny", messages=DIALOG, temperature=0, max_tokens=40)
    text = full.choices[0].message.content
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    assert stop.strip(), f"reply too short to pick a stop string from: {text!r}"
    cut = client.chat.completions.create(model="tiny", messages=DIALOG, temperature=0, max_tokens=40, stop=[stop])
    assert cut.choices[0].message.content == text[: text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    streamed = client.chat.completions.create(model="tiny", messages=DIALOG, temperature=0, max_tokens=40,
                                              stop=stop, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == text[: text.index(stop)]


def test_text_completion_plain_and_streaming(client, tiny_llm):
    r = client.completions.create(model="tiny", prompt="The capital of Varnland", temperature=0, max_tokens=12)
    expected = tiny_llm.text_completion(["The capital of Varnland"], temperature=0, max_gen_len=12)[0]["generation"]
    assert r.object == "text_completion"
    assert r.choices[0].text == expected
    assert r.usage.prompt_tokens == len(tiny_llm.tokenizer.encode("The capital of Varnland", bos=True, eos=False))
    stream = client.completions.create(model="tiny", prompt="The capital of Varnland", temperature=0,
                                       max_tokens=12, stream=True)
    assert "".join(c.choices[0].text for c in stream) == expected


def test_models_and_health(client, live_server):
    import httpx

    models = client.models.list()
    assert [m.id for m in models.data] == ["tiny"]
    assert client.models.retrieve("tiny").id == "tiny"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4")
    assert httpx.get(live_server.base_url + "/health").json()["status"] == "ok"
