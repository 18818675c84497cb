"""Continuous batching: one worker thread runs every request's decode steps as one batch.

Requests arrive from the HTTP handlers at any time. Between two decode steps the worker admits waiting
requests (prefilling their prompts together), so a new request never waits for the running ones to
finish, and finished rows leave at once. Rows of the KV cache are kept contiguous (a finished row is
replaced by the last one), so each step reads one slice of the cache. Results are pushed to each
request's `sink` as `TextDelta` and one final `Finished` event; the sink is called on the worker thread.
With a prefix store (`prefix_cache_tokens` > 0), a finished row's keys and values are kept, and a new prompt
that starts like one of them (the next turn of a conversation) prefills only what follows the common prefix.
"""

from __future__ import annotations

import logging
import threading
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

from llama2.generation.sampling import next_token
from llama2.model.transformer import Transformer
from llama2.serving.batched_forward import SlotCache, forward_rows
from llama2.serving.prefix_store import PrefixStore
from llama2.serving.text import IncrementalDetokenizer, StopMatcher
from llama2.tokenizer.tokenizer import Tokenizer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int
    """Most new tokens; the server has already checked that prompt + max_tokens fits the context."""
    temperature: float = 1.0
    """0 is greedy."""
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    """Generation ends before the first of these strings; they are not returned."""
    seed: int | None = None


@dataclass
class TextDelta:
    text: str


@dataclass
class Finished:
    reason: Literal["stop", "length", "error"]
    prompt_tokens: int
    completion_tokens: int
    """Generated ids, not counting the EOS that ended the sequence."""
    error: str | None = None


Event = TextDelta | Finished


class EngineBusy(RuntimeError):
    """The queue of waiting requests is full."""


@dataclass(eq=False)
class Request:
    """A submitted prompt. `cancel()` (from any thread) frees its batch row at the next step."""

    prompt: list[int]
    params: SamplingParams
    sink: Callable[[Event], None]
    cancelled: bool = False
    finished: bool = False
    """Its `Finished` event has been sent."""

    def cancel(self) -> None:
        self.cancelled = True


@dataclass(eq=False)
class _Row:
    """A request in the running batch."""

    request: Request
    detokenizer: IncrementalDetokenizer
    stopper: StopMatcher
    generator: torch.Generator | None
    generated: list[int] = field(default_factory=list)
    cached: int = 0
    """Positions of this row already in the KV cache; the last sampled id is fed at this position next."""
    done: bool = False


class Engine:
    def __init__(self, model: Transformer, tokenizer: Tokenizer, max_batch_size: int = 16, max_queue: int = 256,
                 prefix_cache_tokens: int = 0):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.max_queue = max_queue
        self.device = model.output.weight.device
        self.cache = SlotCache.allocate(model, max_batch_size)
        self.prefix_store = PrefixStore(prefix_cache_tokens)
        self._pending: deque[Request] = deque()
        self._rows: list[_Row] = []
        self._wake = threading.Condition()
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="llama2-engine", daemon=True)
        self.steps = 0
        """Batched forward passes run so far (decode steps and prefills), for tests and metrics."""
        self.max_rows_seen = 0
        """The largest batch a decode step has run, to show that concurrent requests were batched."""
        self.prompt_tokens = 0
        """Prompt ids admitted so far; `reused_tokens` of them came from the prefix store, the rest were fed."""
        self.reused_tokens = 0

    # --- public, called from other threads ------------------------------------------------------------

    @property
    def running(self) -> int:
        """Sequences in the batch now."""
        return len(self._rows)

    @property
    def waiting(self) -> int:
        """Requests queued for a free batch row."""
        return len(self._pending)

    def start(self) -> Engine:
        self._thread.start()
        return self

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the worker; requests still waiting or running finish with reason 'error'."""
        with self._wake:
            self._stopping = True
            self._wake.notify()
        if self._thread.is_alive():
            self._thread.join(timeout)

    def submit(self, prompt: Sequence[int], params: SamplingParams, sink: Callable[[Event], None]) -> Request:
        if not prompt or len(prompt) + params.max_tokens > self.model.args.max_seq_len:
            raise ValueError(f"prompt of {len(prompt)} ids + {params.max_tokens} new tokens does not fit the context")
        request = Request(list(prompt), params, sink)
        with self._wake:
            if self._stopping:
                raise EngineBusy("the server is shutting down")
            if len(self._pending) >= self.max_queue:
                raise EngineBusy(f"{len(self._pending)} requests are already waiting")
            self._pending.append(request)
            self._wake.notify()
        return request

    # --- the worker -------------------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._wake:
                while not self._stopping and not self._pending and not self._rows:
                    self._wake.wait()
                if self._stopping:
                    break
                admitted = self._admit()
            try:
                with torch.inference_mode():
                    self._drop_cancelled()
                    if self._rows:
                        self._decode()
                    if admitted:
                        self._prefill([self._new_row(request) for request in admitted])
            except Exception as exc:  # a failing batch must not take the server down with it
                log.exception("generation step failed")
                for request in [r.request for r in self._rows] + admitted:
                    if not request.finished:
                        self._emit(request, Finished("error", len(request.prompt), 0, f"generation failed: {exc}"))
                self._rows = []
        with self._wake:
            leftover = [r.request for r in self._rows] + list(self._pending)
            self._rows, self._pending = [], deque()
        for request in leftover:
            self._emit(request, Finished("error", len(request.prompt), 0, error="the server is shutting down"))

    def _admit(self) -> list[Request]:
        """Take waiting requests for the free batch rows (called holding the lock)."""
        admitted: list[Request] = []
        while self._pending and len(self._rows) + len(admitted) < self.max_batch_size:
            request = self._pending.popleft()
            if not request.cancelled:
                admitted.append(request)
        return admitted

    def _new_row(self, request: Request) -> _Row:
        seed = request.params.seed
        generator = torch.Generator(self.device).manual_seed(seed) if seed is not None else None
        return _Row(request, IncrementalDetokenizer(self.tokenizer), StopMatcher(request.params.stop), generator)

    def _drop_cancelled(self) -> None:
        for row in self._rows:
            row.done = row.done or row.request.cancelled
        self._compact()

    def _compact(self) -> None:
        """Remove finished rows, moving the last running row into each freed cache row."""
        i = 0
        while i < len(self._rows):
            if self._rows[i].done:
                self._remember(i, self._rows[i])
                last = len(self._rows) - 1
                if i != last:
                    self.cache.move_row(last, i, self._rows[last].cached)
                    self._rows[i] = self._rows[last]
                self._rows.pop()
            else:
                i += 1

    def _remember(self, index: int, row: _Row) -> None:
        """Offer the ids whose keys and values sit in cache row `index` to the prefix store."""
        self.prefix_store.store((row.request.prompt + row.generated)[: row.cached], self.cache, index)

    def _decode(self) -> None:
        rows = self._rows
        tokens = torch.tensor([[r.generated[-1]] for r in rows], device=self.device)  # (B, 1)
        start = torch.tensor([r.cached for r in rows], device=self.device)
        logits = forward_rows(self.model, self.cache, 0, tokens, start, torch.zeros_like(start))
        self.steps += 1
        self.max_rows_seen = max(self.max_rows_seen, len(rows))
        for r in rows:
            r.cached += 1
        self._sample(rows, logits)
        self._compact()

    def _prefill(self, admitted: list[_Row]) -> None:
        first = len(self._rows)
        self._rows.extend(admitted)
        prompts = [r.request.prompt for r in admitted]
        matches = [self.prefix_store.match(p) for p in prompts]
        # Rows are right-padded to the longest fed part, and padding must stay inside the context: reusing less
        # of a long prompt feeds it more tokens, never more than the longest fed part already holds.
        width = max(len(p) - count for p, (_, count) in zip(prompts, matches, strict=True))
        reused = [min(count, self.model.args.max_seq_len - width) for _, count in matches]
        tokens = torch.zeros((len(admitted), width), dtype=torch.long, device=self.device)  # (B, T)
        for i, (r, (key, _)) in enumerate(zip(admitted, matches, strict=True)):
            if key is not None and reused[i]:
                self.prefix_store.load(key, reused[i], self.cache, first + i)
            tokens[i, : len(r.request.prompt) - reused[i]] = torch.tensor(r.request.prompt[reused[i] :])
            r.cached = len(r.request.prompt)
        start = torch.tensor(reused, device=self.device)
        last = torch.tensor([len(p) - n for p, n in zip(prompts, reused, strict=True)], device=self.device) - 1
        logits = forward_rows(self.model, self.cache, first, tokens, start, last)
        self.steps += 1
        self.prompt_tokens += sum(map(len, prompts))
        self.reused_tokens += sum(reused)
        self._sample(admitted, logits)
        self._compact()

    def _sample(self, rows: list[_Row], logits: torch.Tensor) -> None:
        """Pick each row's next id with its own settings, then emit text and finish rows that are done."""
        if logits.shape[-1] > self.tokenizer.n_words:  # a padded embedding: rows past the tokenizer have no text
            logits[:, self.tokenizer.n_words :] = float("-inf")
        greedy = [i for i, r in enumerate(rows) if r.request.params.temperature == 0]
        ids = torch.empty(len(rows), dtype=torch.long)
        if greedy:
            ids[greedy] = logits[greedy].argmax(dim=-1).cpu()
        for i, r in enumerate(rows):
            p = r.request.params
            if p.temperature != 0:
                ids[i] = int(next_token(logits[i : i + 1], p.temperature, p.top_p, None, r.generator)[0])
        for r, token in zip(rows, ids.tolist(), strict=True):
            self._advance(r, token)

    def _advance(self, row: _Row, token: int) -> None:
        if token == self.tokenizer.eos_id:
            self._finish(row, "stop")
            return
        row.generated.append(token)
        text, stopped = row.stopper.push(row.detokenizer.push(token))
        if text:
            self._emit(row.request, TextDelta(text))
        if stopped:
            self._finish(row, "stop", flush=False)
        elif len(row.generated) >= row.request.params.max_tokens or (
            len(row.request.prompt) + len(row.generated) >= self.model.args.max_seq_len
        ):
            self._finish(row, "length")

    def _finish(self, row: _Row, reason: str, flush: bool = True, error: str | None = None) -> None:
        if flush and reason != "error":
            text, stopped = row.stopper.push(row.detokenizer.flush())
            reason = "stop" if stopped else reason
            text += "" if stopped else row.stopper.flush()
            if text:
                self._emit(row.request, TextDelta(text))
        row.done = True
        self._emit(row.request, Finished(reason, len(row.request.prompt), len(row.generated), error))

    def _emit(self, request: Request, event: Event) -> None:
        request.finished = request.finished or isinstance(event, Finished)
        try:
            request.sink(event)
        except Exception:  # the client went away (closed event loop); stop working for it
            log.debug("sink failed; cancelling request", exc_info=True)
            request.cancel()
