"""The server's prefix cache: a conversation's next request reuses the keys and values of its history and gets
exactly the reply it gets without them."""

from __future__ import annotations

import threading

import pytest
import torch

from llama2 import encode_dialog
from llama2.serving.batched_forward import SlotCache
from llama2.serving.engine import Engine, Finished, SamplingParams, TextDelta
from llama2.serving.prefix_store import PrefixStore

QUESTIONS = ["Tell me about the river Olm.", "And the capital of Varnland?", "A short story, please.",
             "Numbers like 12 and 345?"]


def _replies(engine: Engine, prompts: list[list[int]], max_tokens: int = 10) -> list[str]:
    """Greedy replies to `prompts`, all submitted before the worker can admit any (one prefill together)."""
    texts = [[] for _ in prompts]
    done = threading.Semaphore(0)

    def sink(i: int):
        def push(event) -> None:
            if isinstance(event, TextDelta):
                texts[i].append(event.text)
            elif isinstance(event, Finished):
                assert event.reason != "error", event.error
                done.release()
        return push

    with engine._wake:  # hold the worker off until every request is queued
        for i, prompt in enumerate(prompts):
            engine.submit(prompt, SamplingParams(max_tokens=max_tokens, temperature=0), sink(i))
    for _ in prompts:
        assert done.acquire(timeout=60)
    return ["".join(t) for t in texts]


def _conversations(engine: Engine, turns: int, chats: int) -> tuple[list[list[str]], list[list[list[int]]]]:
    """`chats` conversations played turn by turn, every request carrying the whole history, as a client sends;
    their replies, and the prompts of each turn."""
    dialogs, sent = [[] for _ in range(chats)], []
    for turn in range(turns):
        for c, dialog in enumerate(dialogs):
            dialog.append({"role": "user", "content": QUESTIONS[(turn + c) % len(QUESTIONS)]})
        sent.append([encode_dialog(engine.tokenizer, d) for d in dialogs])
        for dialog, reply in zip(dialogs, _replies(engine, sent[-1]), strict=True):
            dialog.append({"role": "assistant", "content": reply})
    return [[m["content"] for m in d if m["role"] == "assistant"] for d in dialogs], sent


@pytest.fixture
def engines(tiny_llm):
    made = []

    def make(prefix_cache_tokens: int, max_batch_size: int = 4) -> Engine:
        engine = Engine(tiny_llm.model, tiny_llm.tokenizer, max_batch_size, prefix_cache_tokens=prefix_cache_tokens)
        made.append(engine.start())
        return engine

    yield make
    for engine in made:
        engine.shutdown()


def test_conversations_reuse_their_history_and_get_the_same_replies(engines):
    plain, cached = engines(0), engines(4096)
    expected, sent = _conversations(plain, turns=3, chats=3)
    replies, _ = _conversations(cached, turns=3, chats=3)
    assert replies == expected
    assert plain.reused_tokens == 0
    # A turn's prompt starts with the previous turn's prompt, then the reply (re-encoded from its text) follows.
    earlier = sum(len(p) for turn in sent[:-1] for p in turn)
    assert earlier <= cached.reused_tokens < cached.prompt_tokens - sum(len(p) for p in sent[0])
    assert cached.prompt_tokens == plain.prompt_tokens


def test_reuse_is_cut_so_that_padding_stays_inside_the_context(engines, tiny_llm):
    """A long prompt that is mostly stored, prefilled beside a fresh one: padded to the fresh one's length it
    would run past the context, so less of it is reused; the replies do not change."""
    n_ctx = tiny_llm.args.max_seq_len
    long_prompt = [1] + [200 + i % 50 for i in range(n_ctx - 40)]
    fresh = [150 + i % 40 for i in range(101)]
    plain, cached = engines(0), engines(4 * n_ctx)
    _replies(cached, [long_prompt[:-5]])  # stores the long prompt's first part (and its reply)
    reused_before = cached.reused_tokens
    together = [long_prompt, fresh]
    assert _replies(cached, together) == _replies(plain, together)
    reused = cached.reused_tokens - reused_before
    assert 0 < reused <= n_ctx - len(fresh), reused


def _cache_with(values: list[float], n_layers: int = 2) -> SlotCache:
    """A one-row cache whose position p holds the value values[p] in every key and value."""
    row = torch.tensor(values)[None, None, :, None].expand(1, 1, len(values), 2).clone()
    return SlotCache([row.clone() for _ in range(n_layers)], [-row.clone() for _ in range(n_layers)])


def test_store_finds_the_longest_common_prefix_and_copies_it_exactly():
    store = PrefixStore(max_tokens=100)
    store.store([5, 6, 7, 8], _cache_with([1, 2, 3, 4, 0, 0]), row=0)
    store.store([5, 6, 9], _cache_with([1, 2, 30, 0, 0, 0]), row=0)
    key, count = store.match([5, 6, 7, 8, 10])
    assert count == 4
    target = _cache_with([0] * 6)
    store.load(key, count, target, row=0)
    assert target.keys[1][0, 0, :, 0].tolist() == [1, 2, 3, 4, 0, 0]
    assert target.values[0][0, 0, :, 0].tolist() == [-1, -2, -3, -4, 0, 0]
    assert store.match([5, 6, 9, 1])[1] == 3
    assert store.match([5, 6, 7, 8])[1] == 3, "the last id is always fed, never reused"
    assert store.match([4, 6, 7]) == (None, 0)


def test_store_replaces_prefixes_and_evicts_least_recently_used():
    store = PrefixStore(max_tokens=8)
    cache = _cache_with(list(range(1, 9)))
    store.store([1, 2], cache, 0)
    store.store([1, 2, 3, 4], cache, 0)  # extends [1, 2]: replaces it
    assert len(store) == 1 and store.tokens == 4
    store.store([1, 2, 3], cache, 0)  # already held within [1, 2, 3, 4]
    assert len(store) == 1 and store.tokens == 4
    store.store([7, 7, 7], cache, 0)
    store.match([1, 2, 3, 4, 5])  # [1, 2, 3, 4] is now the most recently used
    store.store([8, 8, 8], cache, 0)  # 10 tokens > 8: the least recently used entry ([7, 7, 7]) goes
    assert store.tokens == 7 and store.match([7, 7, 7, 7]) == (None, 0)
    assert store.match([1, 2, 3, 4, 5])[1] == 4
    store.store(list(range(9)), _cache_with(list(range(9))), 0)  # longer than the whole budget: not kept
    assert store.tokens == 7
    with pytest.raises(ValueError, match=">= 0"):
        PrefixStore(-1)


def test_server_reuses_a_conversations_history(live_server):
    """Through HTTP, as an OpenAI client talks: the second request re-sends the first turn, which is reused."""
    import httpx

    def ask(messages: list[dict]) -> dict:
        body = {"model": "tiny", "messages": messages, "temperature": 0, "max_tokens": 8}
        r = httpx.post(live_server.base_url + "/v1/chat/completions", json=body, timeout=60)
        r.raise_for_status()
        return r.json()

    def reused() -> int:
        return httpx.get(live_server.base_url + "/health").json()["reused_prompt_tokens"]

    messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": QUESTIONS[0]}]
    first = ask(messages)
    before = reused()
    messages += [first["choices"][0]["message"], {"role": "user", "content": QUESTIONS[1]}]
    ask(messages)
    assert reused() - before >= first["usage"]["prompt_tokens"]
    health = httpx.get(live_server.base_url + "/health").json()
    assert 0 < health["prefix_cache"]["tokens"] <= health["prefix_cache"]["max_tokens"]
