"""The web chat page in headless Chromium, driven through chromedriver's W3C WebDriver HTTP API (plain httpx).

Loads the page on a phone-sized window, sets a system prompt and temperature 0, sends a message, watches
the reply grow piece by piece, checks it equals the API's reply, continues the conversation, presses Stop,
and saves a screenshot to tests/artifacts/chat-page.png.
"""

from __future__ import annotations

import base64
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from llama2.serving import engine as engine_module

ARTIFACTS = Path(__file__).resolve().parents[1] / "artifacts"
ELEMENT = "element-6066-11e4-a52e-4f735466cecf"  # the W3C key of an element reference
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
CHROMEDRIVER = shutil.which("chromedriver")

pytestmark = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER),
    reason="headless Chromium not installed (apt-get install chromium chromium-driver; .ci/run does this)",
)


class Browser:
    """The few WebDriver commands the test needs."""

    def __init__(self, driver_url: str, user_data_dir: str):
        self.http = httpx.Client(base_url=driver_url, timeout=60)
        args = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-dev-shm-usage", f"--user-data-dir={user_data_dir}", "--window-size=412,860"]
        caps = {"alwaysMatch": {"browserName": "chrome", "goog:chromeOptions": {"binary": CHROMIUM, "args": args}}}
        self.session = self._call("POST", "/session", {"capabilities": caps})["sessionId"]

    def _call(self, method: str, path: str, body: dict | None = None):
        r = self.http.request(method, path, json=body)
        value = r.json()["value"]
        if r.status_code != 200:
            raise RuntimeError(f"webdriver {method} {path}: {value.get('message', value)}")
        return value

    def cmd(self, method: str, path: str, body: dict | None = None):
        return self._call(method, f"/session/{self.session}{path}", body)

    def get(self, url: str) -> None:
        self.cmd("POST", "/url", {"url": url})

    def find(self, css: str) -> str:
        return self.cmd("POST", "/element", {"using": "css selector", "value": css})[ELEMENT]

    def click(self, css: str) -> None:
        self.cmd("POST", f"/element/{self.find(css)}/click", {})

    def type(self, css: str, text: str) -> None:
        self.cmd("POST", f"/element/{self.find(css)}/value", {"text": text})

    def js(self, script: str, *args):
        return self.cmd("POST", "/execute/sync", {"script": script, "args": list(args)})

    def wait_for(self, script: str, timeout: float = 30.0):
        deadline = time.monotonic() + timeout
        while not (value := self.js(script)):
            assert time.monotonic() < deadline, f"timed out waiting for: {script}"
            time.sleep(0.05)
        return value

    def screenshot(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(base64.b64decode(self.cmd("GET", "/screenshot")))

    def quit(self) -> None:
        try:
            self.cmd("DELETE", "")
        finally:
            self.http.close()


@pytest.fixture
def browser(unused_port) -> Iterator[Browser]:
    driver = subprocess.Popen([CHROMEDRIVER, f"--port={unused_port}"], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{unused_port}"
    with tempfile.TemporaryDirectory(prefix="llama2-chromium-") as profile:
        try:
            deadline = time.monotonic() + 20
            while True:
                try:
                    if httpx.get(url + "/status", timeout=1).json()["value"]["ready"]:
                        break
                except httpx.HTTPError:
                    pass
                assert time.monotonic() < deadline, "chromedriver did not start"
                time.sleep(0.1)
            b = Browser(url, profile)
            try:
                yield b
            finally:
                b.quit()
        finally:
            driver.terminate()
            driver.wait(10)


# Records every text the reply bubble shows, so the test can see that it grew in several steps.
WATCH_REPLIES = """
window.replySeries = [];
new MutationObserver(() => {
  const replies = document.querySelectorAll('.msg.assistant');
  if (replies.length) window.replySeries.push(replies[replies.length - 1].textContent);
}).observe(document.getElementById('messages'), {childList: true, subtree: true, characterData: true});
"""

LAST_REPLY_DONE = """
const r = document.querySelectorAll('.msg.assistant');
return r.length && !r[r.length - 1].classList.contains('streaming') && document.getElementById('stop').hidden
  ? r[r.length - 1].textContent : null;
"""


def test_chat_page_streams_a_reply_keeps_history_and_stops(browser, live_server, monkeypatch):
    browser.get(live_server.base_url + "/")
    assert browser.wait_for("return document.getElementById('model-name').textContent") == "tiny"
    browser.click("#settings summary")
    browser.type("#system", "Answer briefly.")
    browser.js("const t = document.getElementById('temperature'); t.value = '0'; t.dispatchEvent(new Event('input'));")
    browser.js("document.getElementById('max-tokens').value = '40';")
    browser.js(WATCH_REPLIES)

    # 1. A streamed reply, equal to the API's greedy reply for the same dialog.
    browser.type("#input", "Tell me a story")
    browser.click("#send")
    reply = browser.wait_for(LAST_REPLY_DONE)
    api = httpx.post(live_server.base_url + "/v1/chat/completions", json={
        "model": "tiny", "temperature": 0, "max_tokens": 40,
        "messages": [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Tell me a story"}],
    }).json()["choices"][0]["message"]["content"]
    assert reply == api
    partial = {s for s in browser.js("return window.replySeries;") if s and s != reply}
    assert partial, "the reply should appear in pieces as it streams"

    # 2. A second turn carries the history: it equals the API's reply for the whole dialog.
    browser.type("#input", "And then?")
    browser.click("#send")
    second = browser.wait_for(LAST_REPLY_DONE)
    dialog = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Tell me a story"},
              {"role": "assistant", "content": reply}, {"role": "user", "content": "And then?"}]
    api2 = httpx.post(live_server.base_url + "/v1/chat/completions", json={
        "model": "tiny", "temperature": 0, "max_tokens": 40, "messages": dialog}).json()["choices"][0]["message"]
    assert second == api2["content"]
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    browser.screenshot(ARTIFACTS / "chat-page.png")

    # 3. On a phone-sized window nothing overflows sideways.
    assert browser.js("return document.documentElement.scrollWidth <= window.innerWidth + 1;")

    # 4. Stop: press it as soon as the first piece of a long reply arrives. The tiny model writes 150 tokens
    # faster than WebDriver can click, so each model step is slowed to 0.1 s: the reply is still running.
    real_forward_rows = engine_module.forward_rows

    def slow_forward_rows(*args, **kwargs):
        time.sleep(0.1)
        return real_forward_rows(*args, **kwargs)

    monkeypatch.setattr(engine_module, "forward_rows", slow_forward_rows)
    browser.click("#new-chat")
    browser.js("document.getElementById('max-tokens').value = '150';")
    browser.type("#input", "Tell me a very long story")
    browser.click("#send")
    browser.wait_for("const r = document.querySelector('.msg.assistant'); return r && r.textContent.length > 0;")
    browser.click("#stop")
    assert browser.wait_for("return document.getElementById('status').textContent") == "(stopped)"
    assert browser.js("return document.getElementById('stop').hidden && !document.getElementById('send').hidden;")
