"""Load test of `llama2 serve`: 1, 4 and 16 concurrent clients against a small model on CPU.

    python -m benchmarks.serving_load

The server runs in its own process (as a user runs it), so the clients do not share its interpreter lock.
Each client sends REQUESTS chat completions one after another (64 new tokens, sampled with a per-request
seed). Throughput counts the completion tokens the server reports in `usage`; latency is per request.
Model: llama2.c's stories15M shape (dim 288, 6 layers) with random weights and a 384-piece tokenizer.
"""

from __future__ import annotations

import asyncio
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from benchmarks.common import machine, markdown_table

CLIENTS = (1, 4, 16)
REQUESTS = 6
MAX_TOKENS = 64
WORDS = ["owl", "river", "capital", "queen", "story", "song", "bird", "cat", "dog", "tree", "stone", "boat"]


def _checkpoint(root: Path) -> Path:
    from llama2 import ModelArgs, Transformer
    from llama2.model.checkpoint import save_hf
    from llama2.tokenizer.train import train_tokenizer

    corpus = root / "corpus.txt"
    n = len(WORDS)
    lines = [f"The {WORDS[i % n]} saw the {WORDS[5 * i % n]} near the {WORDS[7 * i % n]} at {i}." for i in range(300)]
    corpus.write_text("\n".join(lines) + "\n")
    tokenizer = train_tokenizer([corpus], root / "tok", vocab_size=384, num_threads=1)
    model = Transformer(ModelArgs.from_preset("stories15M", vocab_size=384, max_seq_len=256))
    model.init_weights(seed=0)
    return save_hf(model, root / "model", tokenizer_model=tokenizer)


def _start_server(model_dir: Path, port: int) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-m", "llama2.cli", "serve", "--model", str(model_dir),
                             "--port", str(port), "--max-batch-size", "16"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return proc
        except httpx.HTTPError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError("the server did not start") from None
            time.sleep(0.2)


async def _client(http: httpx.AsyncClient, index: int, latencies: list[float]) -> int:
    tokens = 0
    for r in range(REQUESTS):
        body = {"model": "bench", "max_tokens": MAX_TOKENS, "temperature": 0.8, "seed": 1000 * (index + 1) + r,
                "messages": [{"role": "user", "content": f"Tell me about the {WORDS[(index + r) % len(WORDS)]}."}]}
        start = time.perf_counter()
        response = await http.post("/v1/chat/completions", json=body)
        response.raise_for_status()
        latencies.append(time.perf_counter() - start)
        tokens += response.json()["usage"]["completion_tokens"]
    return tokens


async def _load(base_url: str, clients: int) -> dict:
    latencies: list[float] = []
    limits = httpx.Limits(max_connections=clients)
    async with httpx.AsyncClient(base_url=base_url, timeout=300, limits=limits) as http:
        await _client(http, -1, [])  # warm-up
        start = time.perf_counter()
        tokens = sum(await asyncio.gather(*(_client(http, i, latencies) for i in range(clients))))
        wall = time.perf_counter() - start
    latencies.sort()
    return {
        "clients": clients,
        "requests": len(latencies),
        "requests/s": len(latencies) / wall,
        "tokens/s": tokens / wall,
        "p50 latency s": statistics.median(latencies),
        "p99 latency s": latencies[min(len(latencies) - 1, round(0.99 * (len(latencies) - 1)))],
    }


def run() -> list[dict]:
    import socket

    with tempfile.TemporaryDirectory(prefix="llama2-serving-bench-") as tmp:
        model_dir = _checkpoint(Path(tmp))
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        server = _start_server(model_dir, port)
        try:
            rows = [asyncio.run(_load(f"http://127.0.0.1:{port}", c)) for c in CLIENTS]
        finally:
            server.terminate()
            server.wait(30)
    base = rows[0]["tokens/s"]
    for row in rows:
        row["tokens/s vs 1 client"] = f"{row['tokens/s'] / base:.1f}x"
        for key in ("p50 latency s", "p99 latency s"):
            row[key] = f"{row[key]:.2f}"
    return rows


if __name__ == "__main__":
    print(f"machine: {machine()}\n")
    print(markdown_table(run()))
