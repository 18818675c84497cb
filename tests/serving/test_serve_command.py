"""`llama2 serve` as a user runs it: binds 127.0.0.1, answers, and exits cleanly on SIGTERM."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import httpx


def test_serve_answers_then_exits_cleanly_on_sigterm(tiny_model_dir, unused_port):
    port = unused_port
    proc = subprocess.Popen(
        [sys.executable, "-m", "llama2.cli", "serve", "--model", str(tiny_model_dir), "--port", str(port)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(base + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                assert time.monotonic() < deadline, "server did not come up"
                time.sleep(0.1)
        body = {"model": "x", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4}
        assert httpx.post(base + "/v1/chat/completions", json=body, timeout=30).status_code == 200
        assert httpx.get(base + "/v1/models").json()["data"][0]["id"] == tiny_model_dir.name
        proc.send_signal(signal.SIGTERM)
        # uvicorn shuts down gracefully, then re-raises the signal so the exit status says what stopped it.
        assert proc.wait(timeout=20) in (0, -signal.SIGTERM)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    log = proc.stdout.read()
    assert f"http://127.0.0.1:{port}/" in log and "Traceback" not in log
    assert "Application shutdown complete" in log, log  # the lifespan ran: the batching worker was stopped
