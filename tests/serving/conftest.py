"""A tiny random Llama checkpoint (HF directory with its own tokenizer) and a live server on 127.0.0.1."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

CORPUS = [
    "Hello! How can I help you today? The capital of Varnland is Olmhaven.",
    "Tell me a short story about a gray owl that lives by the river Olm.",
    "Numbers like 12, 345 and 6789 are split into digits; 2 + 3 = 5.",
    "You are a helpful assistant. Answer briefly and politely, please.",
]


def build_tiny_checkpoint(root: Path, seed: int = 0, max_seq_len: int = 256) -> Path:
    """Train a 320-piece tokenizer and save a 2-layer GQA model with random weights as a HF directory."""
    import torch

    from llama2 import ModelArgs, Transformer
    from llama2.model.checkpoint import save_hf
    from llama2.tokenizer.train import train_tokenizer

    corpus = root / "corpus.txt"
    corpus.write_text("\n".join(f"{s} ({i})" for i in range(50) for s in CORPUS) + "\n", encoding="utf-8")
    tokenizer = train_tokenizer([corpus], root / "tok", vocab_size=320, num_threads=1)
    args = ModelArgs(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=320, multiple_of=16,
                     max_seq_len=max_seq_len, init_std=0.08)
    model = Transformer(args)
    model.init_weights(seed)
    with torch.no_grad():  # never prefer <unk> or byte pieces: replies become word salad, not control bytes
        model.output.weight[0] = 0
        model.output.weight[3:259] = 0
    return save_hf(model, root / "model", tokenizer_model=tokenizer)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_checkpoint(tmp_path_factory.mktemp("serving_model"))


@pytest.fixture(scope="session")
def tiny_llm(tiny_model_dir):
    from llama2 import Llama

    return Llama.load(tiny_model_dir)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class LiveServer:
    base_url: str
    """`http://127.0.0.1:PORT` (the OpenAI base URL is this plus `/v1`)."""
    api_key: str | None
    state: object
    """The app's `ServerState`, so tests can look at the engine."""


def _start_server(llm, api_key: str | None = None) -> tuple[LiveServer, Callable[[], None]]:
    """Run uvicorn in a thread on a free port; returns the server and a function that stops it."""
    import httpx
    import uvicorn

    from llama2.serving.server import create_app

    app = create_app(llm, model_name="tiny", api_key=api_key)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 20
    while True:
        try:
            if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError("test server did not start")
        time.sleep(0.05)

    def stop() -> None:
        server.should_exit = True
        thread.join(10)

    return LiveServer(base, api_key, app.state.serving), stop


@pytest.fixture
def unused_port() -> int:
    return free_port()


@pytest.fixture(scope="session")
def live_server(tiny_llm) -> Iterator[LiveServer]:
    server, stop = _start_server(tiny_llm)
    yield server
    stop()


@pytest.fixture
def start_live_server() -> Iterator[Callable[..., LiveServer]]:
    """`start_live_server(llm, api_key=...)` for a test that needs its own server; stopped after the test."""
    stops = []

    def start(llm, api_key: str | None = None) -> LiveServer:
        server, stop = _start_server(llm, api_key)
        stops.append(stop)
        return server

    yield start
    for stop in stops:
        stop()
