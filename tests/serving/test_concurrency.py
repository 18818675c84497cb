"""16 simultaneous clients are batched together and get exactly the replies they get one at a time."""

from __future__ import annotations

import asyncio
import json
import time

import httpx

CLIENTS = 16
TOPICS = ["an owl", "the river Olm", "Varnland", "a gray cat", "numbers", "a song", "the queen", "a dog",
          "Olmhaven", "a bird", "seven owls", "a story", "the capital", "a tiny model", "digits", "a river"]


def _request(i: int) -> dict:
    messages = [{"role": "user", "content": f"Tell me about {TOPICS[i]}."}]
    if i % 3 == 0:
        messages.insert(0, {"role": "system", "content": "Answer briefly."})
    return {"model": "tiny", "messages": messages, "temperature": 0, "max_tokens": 12 + i % 5 * 4,
            "stream": i % 2 == 1}


async def _reply(client: httpx.AsyncClient, body: dict) -> str:
    if not body["stream"]:
        r = await client.post("/v1/chat/completions", json=body)
        r.raise_for_status()
        return r.json()["choices"][0]["message"]["content"]
    text = []
    async with client.stream("POST", "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                text.append(json.loads(line[6:])["choices"][0]["delta"].get("content", ""))
    return "".join(text)


def test_sixteen_concurrent_greedy_clients_match_single_requests(live_server):
    engine = live_server.state.engine
    engine.max_rows_seen = 0  # a max over the session's earlier tests; start it afresh

    async def one_at_a_time() -> list[str]:
        async with httpx.AsyncClient(base_url=live_server.base_url, timeout=60) as client:
            return [await _reply(client, _request(i)) for i in range(CLIENTS)]

    async def all_at_once() -> list[str]:
        limits = httpx.Limits(max_connections=CLIENTS)
        async with httpx.AsyncClient(base_url=live_server.base_url, timeout=60, limits=limits) as client:
            return await asyncio.gather(*(_reply(client, _request(i)) for i in range(CLIENTS)))

    steps = engine.steps
    singles = asyncio.run(one_at_a_time())
    sequential_steps, steps = engine.steps - steps, engine.steps
    together = asyncio.run(all_at_once())
    concurrent_steps = engine.steps - steps

    assert together == singles
    assert all(singles), "every client should get a non-empty reply"
    assert engine.max_rows_seen >= CLIENTS // 2, "concurrent requests should share decode steps"
    assert concurrent_steps * 3 < sequential_steps, (concurrent_steps, sequential_steps)


def test_client_disconnect_frees_the_batch_row(live_server):
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Tell me a story"}], "temperature": 1.0,
            "max_tokens": 200, "stream": True, "seed": 1}
    engine = live_server.state.engine
    with httpx.Client(base_url=live_server.base_url, timeout=30) as client:
        whole = client.post("/v1/chat/completions", json={**body, "stream": False}).json()
        assert whole["usage"]["completion_tokens"] == 200, "pick a seed whose reply runs to max_tokens"
        steps = engine.steps
        with client.stream("POST", "/v1/chat/completions", json=body) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: ")  # the opening role chunk; now walk away mid-reply
        deadline = time.monotonic() + 10
        while client.get("/health").json()["running"]:
            assert time.monotonic() < deadline, "the cancelled sequence is still running"
            time.sleep(0.02)
        assert engine.steps - steps < 100, "generation went on after the client left"
