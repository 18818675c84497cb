"""The bridge between an HTTP handler (asyncio) and the engine's worker thread.

One API call may ask for several completions (`n`, or several prompts); they are submitted together and
their events arrive, tagged with the choice index, on one asyncio queue. Leaving `events()` early (the
client disconnected, or the stop button was pressed) cancels whatever is still running.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field

from llama2.serving.engine import Engine, EngineBusy, Event, Finished, Request, SamplingParams, TextDelta
from llama2.serving.errors import APIError


@dataclass
class Job:
    prompt: list[int]
    params: SamplingParams


@dataclass
class Outcome:
    """Everything one choice produced, for a non-streaming reply."""

    text: list[str] = field(default_factory=list)
    finished: Finished | None = None


class Submission:
    def __init__(self, engine: Engine, jobs: Sequence[Job]):
        loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()
        self._requests: list[Request] = []
        self._count = len(jobs)
        try:
            for i, job in enumerate(jobs):
                sink = lambda event, i=i: loop.call_soon_threadsafe(self._queue.put_nowait, (i, event))  # noqa: E731
                self._requests.append(engine.submit(job.prompt, job.params, sink))
        except EngineBusy as exc:
            self.cancel()
            message = f"the server is busy: {exc}; retry shortly"
            raise APIError(503, message, None, "overloaded", "server_error") from exc

    def cancel(self) -> None:
        for request in self._requests:
            request.cancel()

    async def events(self) -> AsyncIterator[tuple[int, Event]]:
        """`(choice index, event)` until every choice has finished."""
        remaining = self._count
        try:
            while remaining:
                index, event = await self._queue.get()
                remaining -= isinstance(event, Finished)
                yield index, event
        finally:
            self.cancel()

    async def collect(self) -> list[Outcome]:
        outcomes = [Outcome() for _ in range(self._count)]
        async for index, event in self.events():
            if isinstance(event, TextDelta):
                outcomes[index].text.append(event.text)
            else:
                outcomes[index].finished = event
        return outcomes
