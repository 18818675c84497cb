"""Multi-turn chat through the batching engine, with and without the server's prefix cache.

    python -m benchmarks.serving_chat [--device cuda] [--preset 7B] [--dtype bfloat16]

An OpenAI-style client sends the whole conversation with every request. CONVERSATIONS clients each hold a
TURNS-turn chat (a long system prompt, then a user message a turn) and send their requests at the same time,
turn by turn, as `llama2 serve` receives them. With the prefix store (`--prefix-cache-tokens`, on by default)
each request prefills only what follows the longest prefix a finished request left behind. Both runs must give
the same greedy replies (checked). Weights are random, as in `benchmarks.serving_engine`.
"""

from __future__ import annotations

import threading
import time

import torch

from benchmarks.common import model_benchmark_main
from benchmarks.serving_engine import WORDS, random_model, word_tokenizer
from llama2 import Tokenizer, encode_dialog
from llama2.serving.engine import Engine, Finished, SamplingParams, TextDelta

CONVERSATIONS = 8
TURNS = 6
NEW_TOKENS = 48
CONTEXT = 1024


def _message(c: int, turn: int, words: int) -> str:
    return " ".join(f"the {WORDS[(c + 5 * turn + 7 * i) % len(WORDS)]} saw {i}" for i in range(words)) + "."


def _turn(engine: Engine, prompts: list[list[int]]) -> list[str]:
    """Greedy replies to requests arriving together."""
    texts = [[] for _ in prompts]
    done = threading.Semaphore(0)

    def sink_for(i: int):
        def sink(event) -> None:
            if isinstance(event, TextDelta):
                texts[i].append(event.text)
            elif isinstance(event, Finished):
                done.release()
        return sink

    for i, prompt in enumerate(prompts):
        engine.submit(prompt, SamplingParams(max_tokens=NEW_TOKENS, temperature=0), sink_for(i))
    for _ in prompts:
        done.acquire()
    return ["".join(t) for t in texts]


def _chat(engine: Engine, tokenizer: Tokenizer) -> tuple[list[list[str]], float]:
    dialogs = [[{"role": "system", "content": _message(c, -1, 12)}] for c in range(CONVERSATIONS)]
    start = time.perf_counter()
    for turn in range(TURNS):
        for c, dialog in enumerate(dialogs):
            dialog.append({"role": "user", "content": _message(c, turn, 4)})
        replies = _turn(engine, [encode_dialog(tokenizer, d) for d in dialogs])
        for dialog, reply in zip(dialogs, replies, strict=True):
            dialog.append({"role": "assistant", "content": reply})
    wall = time.perf_counter() - start
    return [[m["content"] for m in d if m["role"] == "assistant"] for d in dialogs], wall


def run(device: str = "cpu", preset: str = "stories15M", dtype: str = "float32") -> list[dict]:
    tokenizer = word_tokenizer()
    model = random_model(preset, tokenizer.n_words, CONTEXT, device, dtype)
    with torch.no_grad():  # random weights would end most replies at once: keep EOS below the likeliest piece
        model.output.weight[tokenizer.eos_id] = 0
    rows, replies = [], {}
    for store in (0, 2 * CONTEXT * CONVERSATIONS):
        engine = Engine(model, tokenizer, max_batch_size=CONVERSATIONS, prefix_cache_tokens=store).start()
        try:
            _turn(engine, [tokenizer.encode("warm up", bos=True, eos=False)])  # kernels, allocator
            engine.prompt_tokens = engine.reused_tokens = 0
            replies[store], wall = _chat(engine, tokenizer)
        finally:
            engine.shutdown()
        fed = engine.prompt_tokens - engine.reused_tokens
        rows.append({"prefix cache": f"{store} tokens" if store else "off", "wall s": f"{wall:.2f}",
                     "reply chars": sum(len(r) for chat in replies[store] for r in chat),
                     "prompt tokens": engine.prompt_tokens, "prefilled": fed,
                     "reused": f"{engine.reused_tokens / engine.prompt_tokens:.0%}",
                     "model": f"{preset} {dtype} {device}, {CONVERSATIONS} chats x {TURNS} turns"})
    off, on = replies.values()
    same = sum(a == b for x, y in zip(off, on, strict=True) for a, b in zip(x, y, strict=True))
    if dtype == "float32":  # 16-bit kernels round differently for different prefill lengths: greedy may diverge
        assert same == CONVERSATIONS * TURNS, f"only {same} of {CONVERSATIONS * TURNS} replies are the same"
    rows[1]["same replies"] = f"{same}/{CONVERSATIONS * TURNS}"
    rows[1]["speed-up"] = f"{float(rows[0]['wall s']) / float(rows[1]['wall s']):.2f}x"
    return rows


if __name__ == "__main__":
    model_benchmark_main(run, __doc__.splitlines()[0])
