"""The batching engine without HTTP: 1, 4 and 16 concurrent clients, on CPU or GPU.

    python -m benchmarks.serving_engine [--device cuda] [--preset 7B] [--dtype bfloat16]

Separates what continuous batching buys in the model from the HTTP and JSON costs that
`benchmarks.serving_load` includes. Each client (a thread) submits REQUESTS greedy requests one after another
(128 new tokens). Before timing (in float32), the greedy replies of 16 concurrent requests are checked against
the reference `generate()` run one prompt at a time, on the same device.
Weights are random; the tokenizer is a 384-piece SentencePiece model, and sampling is limited to its pieces.
"""

from __future__ import annotations

import statistics
import tempfile
import threading
import time
from pathlib import Path

import torch

from benchmarks.common import model_benchmark_main
from llama2 import ModelArgs, Tokenizer, Transformer
from llama2.generation.generator import generate
from llama2.serving.engine import Engine, Finished, SamplingParams
from llama2.tokenizer.train import train_tokenizer

CLIENTS = (1, 4, 16)
REQUESTS = 3
NEW_TOKENS = 128
WORDS = ["owl", "river", "capital", "queen", "story", "song", "bird", "cat", "dog", "tree", "stone", "boat"]


def _prompt(tokenizer: Tokenizer, i: int) -> list[int]:
    return tokenizer.encode(f"Tell me about the {WORDS[i % len(WORDS)]} and the {WORDS[(3 * i) % len(WORDS)]}.",
                            bos=True, eos=False)


def _submit_and_wait(engine: Engine, prompt: list[int], params: SamplingParams) -> Finished:
    done = threading.Event()
    result: list[Finished] = []

    def sink(event) -> None:
        if isinstance(event, Finished):
            result.append(event)
            done.set()

    engine.submit(prompt, params, sink)
    done.wait()
    return result[0]


def _check_greedy(engine: Engine, model: Transformer, tokenizer: Tokenizer) -> None:
    """16 concurrent greedy requests must give the reference generator's replies, one prompt at a time."""
    params = SamplingParams(max_tokens=32, temperature=0)
    texts: dict[int, list[str]] = {i: [] for i in range(16)}
    done = [threading.Event() for _ in range(16)]

    def sink_for(i: int):
        def sink(event) -> None:
            if isinstance(event, Finished):
                done[i].set()
            else:
                texts[i].append(event.text)
        return sink

    for i in range(16):
        engine.submit(_prompt(tokenizer, i), params, sink_for(i))
    for d in done:
        d.wait()
    for i in range(16):
        ref = generate(model, [_prompt(tokenizer, i)], 32, stop_ids=[tokenizer.eos_id], temperature=0)
        assert "".join(texts[i]) == tokenizer.decode(ref.tokens[0]), f"request {i}: batched != single"


def _load(engine: Engine, tokenizer: Tokenizer, clients: int) -> dict:
    latencies: list[float] = []
    tokens = [0] * clients

    def client(c: int) -> None:
        for r in range(REQUESTS):
            start = time.perf_counter()
            params = SamplingParams(max_tokens=NEW_TOKENS, temperature=0.8, seed=100 * c + r)
            tokens[c] += _submit_and_wait(engine, _prompt(tokenizer, c + r), params).completion_tokens
            latencies.append(time.perf_counter() - start)

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    return {"clients": clients, "requests": len(latencies), "tokens/s": sum(tokens) / wall,
            "p50 latency s": f"{statistics.median(latencies):.2f}", "max latency s": f"{max(latencies):.2f}"}


def word_tokenizer() -> Tokenizer:
    """A 384-piece SentencePiece model of sentences made from WORDS."""
    n = len(WORDS)
    lines = [f"The {WORDS[i % n]} saw the {WORDS[5 * i % n]} near the {WORDS[7 * i % n]} at {i}." for i in range(300)]
    with tempfile.TemporaryDirectory(prefix="llama2-engine-bench-") as tmp:
        root = Path(tmp)
        (root / "corpus.txt").write_text("\n".join(lines) + "\n")
        return Tokenizer(train_tokenizer([root / "corpus.txt"], root, vocab_size=384, num_threads=1))


def random_model(preset: str, vocab_size: int, max_seq_len: int, device: str, dtype: str) -> Transformer:
    torch.manual_seed(0)
    with torch.device(device):
        model = Transformer(ModelArgs.from_preset(preset, vocab_size=vocab_size, max_seq_len=max_seq_len))
        model.init_weights()  # no seeded CPU generator: the weights may be on the GPU
    return model.to(getattr(torch, dtype)).eval()


def run(device: str = "cpu", preset: str = "stories15M", dtype: str = "float32") -> list[dict]:
    tokenizer = word_tokenizer()
    model = random_model(preset, tokenizer.n_words, 512, device, dtype)
    engine = Engine(model, tokenizer, max_batch_size=16).start()
    try:
        if dtype == "float32":  # in 16-bit, kernels for different batch sizes round differently: greedy may diverge
            _check_greedy(engine, model, tokenizer)
        _load(engine, tokenizer, 1)  # warm-up
        rows = [_load(engine, tokenizer, c) for c in CLIENTS]
    finally:
        engine.shutdown()
    base = rows[0]["tokens/s"]
    for row in rows:
        row["vs 1 client"] = f"{row['tokens/s'] / base:.1f}x"
        row["model"] = f"{preset} {dtype} {device}"
    return rows


if __name__ == "__main__":
    model_benchmark_main(run, __doc__.splitlines()[0])
