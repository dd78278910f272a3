"""`slots` generations at a time (one without --parallel), a bounded wait queue, and cancellation from the
event loop.

Each running job has a worker thread (the engine's steps are shared: runtime/batching.py); the event
loop only waits for a turn and relays text. A request that finds the queue full is refused with 429
at once (docs/API.md).
"""
from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable

from dllama.runtime.serve.openai_api import ApiError


@dataclass
class Event:
    kind: str          # "text" (value: a runner.Piece), "done" (an Outcome) or "error" (the exception)
    value: Any


class Scheduler:
    def __init__(self, max_queue: int, slots: int = 1):
        self.max_queue = max_queue
        self.slots = slots
        self.waiting = 0
        self._turn = asyncio.Semaphore(slots)
        self._executor = ThreadPoolExecutor(max_workers=slots, thread_name_prefix="dllama-engine")

    @property
    def busy(self) -> bool:
        """Every slot is generating: a new request waits."""
        return self._turn.locked()

    async def acquire(self) -> None:
        # waiters can outlive locked() for a moment after a release: they still hold their places
        if self.waiting >= self.max_queue and (self._turn.locked() or self.waiting > 0):
            raise ApiError(429, f"the server is busy: {self.waiting} requests are already waiting for the model "
                                f"(queue limit {self.max_queue}); retry later",
                           type="rate_limit_error", code="queue_full")
        self.waiting += 1
        try:
            await self._turn.acquire()
        finally:
            self.waiting -= 1

    def release(self) -> None:
        self._turn.release()

    def start(self, work: Callable[[threading.Event, Callable[[Any], None]], Any],
              cancelled: threading.Event) -> "Running":
        """Runs work(cancelled, emit) on the engine thread; call only while holding the turn."""
        return Running(self, work, cancelled)

    def shutdown(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)


class Running:
    """A job on the engine thread, seen from the event loop as a queue of events."""

    def __init__(self, scheduler: Scheduler, work: Callable[[threading.Event, Callable[[Any], None]], Any],
                 cancelled: threading.Event):
        self.cancelled = cancelled
        self.events: asyncio.Queue[Event] = asyncio.Queue()
        self._scheduler = scheduler
        self._closed = False
        loop = asyncio.get_running_loop()

        def put(event: Event) -> None:
            loop.call_soon_threadsafe(self.events.put_nowait, event)

        def body() -> None:
            try:
                put(Event("done", work(self.cancelled, lambda piece: put(Event("text", piece)))))
            except BaseException as e:  # relayed to the request, never lost in the thread
                put(Event("error", e))

        self._future = loop.run_in_executor(scheduler._executor, body)

    async def next(self) -> Event:
        return await self.events.get()

    async def close(self) -> None:
        """Stops the job (if still running), waits for the engine to be free, gives up the turn."""
        if self._closed:
            return
        self._closed = True
        self.cancelled.set()
        # the turn goes back when the engine thread is really done, even if this await is cancelled
        self._future.add_done_callback(lambda _: self._scheduler.release())
        await asyncio.shield(self._future)
