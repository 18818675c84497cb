"""The server's per-row forward must equal `Transformer.forward`, and the engine must equal `generate`."""

from __future__ import annotations

import threading

import torch

from llama2.generation.generator import generate
from llama2.serving.batched_forward import SlotCache, forward_rows
from llama2.serving.engine import Engine, Finished, SamplingParams, TextDelta


def test_forward_rows_matches_full_forward_for_ragged_rows(tiny_llm):
    model = tiny_llm.model
    torch.manual_seed(0)
    seqs = [torch.randint(3, 320, (n,)) for n in (7, 3, 11)]
    cache = SlotCache.allocate(model, 4)
    # Prefill rows 1..3 with ragged prompts (all but the last id), then decode the last id at each row's own position.
    lengths = torch.tensor([len(s) - 1 for s in seqs])
    tokens = torch.zeros(3, int(lengths.max()), dtype=torch.long)
    for i, s in enumerate(seqs):
        tokens[i, : len(s) - 1] = s[:-1]
    prefill = forward_rows(model, cache, 1, tokens, torch.zeros(3, dtype=torch.long), lengths - 1)
    step = forward_rows(model, cache, 1, torch.stack([s[-1:] for s in seqs]), lengths, torch.zeros(3, dtype=torch.long))
    with torch.inference_mode():
        for i, s in enumerate(seqs):
            full = model(s[None])[0]  # (T, V)
            torch.testing.assert_close(prefill[i], full[-2], atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(step[i], full[-1], atol=1e-5, rtol=1e-4)


def _collect(engine: Engine, prompt: list[int], params: SamplingParams) -> tuple[list, threading.Event]:
    """Submit and return the list the events will land in, and an event set once the request finishes."""
    events: list = []
    done = threading.Event()

    def sink(event) -> None:
        events.append(event)
        if isinstance(event, Finished):
            done.set()

    engine.submit(prompt, params, sink)
    return events, done


def test_engine_greedy_batch_equals_reference_generate(tiny_llm):
    tok = tiny_llm.tokenizer
    prompts = [tok.encode(s, bos=True, eos=False) for s in ("Hello", "Tell me a story about an owl", "2 + 3 =", "You")]
    reference = generate(tiny_llm.model, prompts, 24, stop_ids=[tok.eos_id], temperature=0)
    engine = Engine(tiny_llm.model, tok, max_batch_size=3).start()  # 4 prompts, 3 rows: one waits for a free row
    try:
        runs = [_collect(engine, p, SamplingParams(max_tokens=24, temperature=0)) for p in prompts]
        for _, done in runs:
            assert done.wait(30)
    finally:
        engine.shutdown()
    for (events, _), expected in zip(runs, reference.tokens, strict=True):
        text = "".join(e.text for e in events if isinstance(e, TextDelta))
        assert text == tok.decode(expected)
        assert events[-1].completion_tokens == len(expected)
        assert events[-1].reason == ("length" if len(expected) == 24 else "stop")
    assert engine.max_rows_seen == 3


def test_a_failing_step_fails_its_requests_and_the_engine_recovers(tiny_llm, monkeypatch):
    import llama2.serving.engine as engine_module

    real, calls = engine_module.forward_rows, []

    def fails_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("out of memory (simulated)")
        return real(*args, **kwargs)

    monkeypatch.setattr(engine_module, "forward_rows", fails_once)
    prompt = tiny_llm.tokenizer.encode("Hello", bos=True, eos=False)
    engine = Engine(tiny_llm.model, tiny_llm.tokenizer, max_batch_size=2).start()
    try:
        failed, done = _collect(engine, prompt, SamplingParams(max_tokens=5, temperature=0))
        assert done.wait(30)
        assert failed[-1].reason == "error" and "simulated" in failed[-1].error
        ok, done = _collect(engine, prompt, SamplingParams(max_tokens=5, temperature=0))
        assert done.wait(30)
        assert ok[-1].reason in ("stop", "length") and ok[-1].completion_tokens > 0
    finally:
        engine.shutdown()
