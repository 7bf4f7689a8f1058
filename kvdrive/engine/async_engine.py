"""``AsyncEngine``: an ``Engine`` stepped by its own thread, fed from asyncio.

The server's event loop submits requests and aborts; the engine thread owns the engine
(and with it the model and the cache): it takes what was submitted between steps, runs a
step while there is work, and hands each request's events to that request's asyncio queue
(one ``call_soon_threadsafe`` per request and step). It sleeps while there is nothing to do.

    stream = engine.submit(request)       # on the event loop; QueueFull when the queue is full
    async for event in stream: ...        # TokenEvents until the one with a finish_reason
    stream.abort()                        # e.g. the client went away: its KV is freed next step

``snapshot`` is the engine's state as of a recent step: refreshed every ``stats_interval``
seconds while busy, after any step that finishes a request (before its events go out) and
whenever the engine becomes idle. An ``observer``
(metrics) is called on the engine thread as requests arrive, make tokens and finish.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import deque

from kvdrive.engine.core import Engine, EngineSnapshot
from kvdrive.engine.request import Request, TokenEvent
from kvdrive.errors import KvdriveError

log = logging.getLogger("kvdrive.engine")


class QueueFull(KvdriveError):
    """More requests wait than the engine queues; try again later."""


class RequestObserver:
    """Called on the engine thread; ``now`` is ``time.perf_counter()``. Default: nothing."""

    def added(self, req: Request, now: float) -> None:
        """``req`` reached the engine."""

    def tokens(self, events: list[TokenEvent], now: float) -> None:
        """One step's events."""

    def finished(self, req: Request, now: float) -> None:
        """``req`` left the engine (its ``finish_reason`` says why)."""


_END = object()


class RequestStream:
    """The events of one submitted request, as an async iterator (ends after the event that
    finishes it; an aborted request ends without one)."""

    def __init__(self, engine: AsyncEngine, req: Request, loop: asyncio.AbstractEventLoop):
        self.engine, self.req, self._loop = engine, req, loop
        self._queue: asyncio.Queue = asyncio.Queue()
        self.done = False

    def __aiter__(self):
        return self

    async def __anext__(self) -> TokenEvent:
        if self.done:
            raise StopAsyncIteration
        item = await self._queue.get()
        if item is _END:
            self.done = True
            raise StopAsyncIteration
        return item

    def abort(self) -> None:
        """Stop the request; its KV is freed before the engine's next step."""
        if not self.done:
            self.engine.abort(self.req.seq_id)

    def _deliver(self, items: list) -> None:  # on the event loop
        for item in items:
            self._queue.put_nowait(item)


class AsyncEngine:
    def __init__(
        self,
        engine: Engine,
        max_waiting: int | None = None,
        observer: RequestObserver | None = None,
        stats_interval: float = 1.0,
    ):
        """``max_waiting``: requests that may wait for admission before ``submit`` raises
        ``QueueFull`` (None: no limit)."""
        self.engine, self.max_waiting = engine, max_waiting
        self.observer = observer or RequestObserver()
        self.stats_interval = stats_interval
        self._inbox: deque = deque()  # ("add", stream) | ("abort", seq_id), appended by any thread
        self._streams: dict[int, RequestStream] = {}  # engine thread only
        self._wake = threading.Event()
        self._stop = False
        self._published = 0.0
        self.snapshot: EngineSnapshot = engine.snapshot()
        self._thread = threading.Thread(target=self._run, name="kvdrive-engine", daemon=True)
        self._thread.start()

    # -- any thread --------------------------------------------------------------------
    @property
    def num_waiting(self) -> int:
        """Requests submitted and not admitted, beyond the sequence slots free now: those that will
        wait (read from another thread, so a close estimate)."""
        pending = self.engine.num_waiting + sum(1 for kind, _ in list(self._inbox) if kind == "add")
        return max(0, pending - (self.engine.sched.max_batch - self.engine.sched.num_admitted))

    def submit(self, req: Request) -> RequestStream:
        """Queue ``req`` (on the event loop that will read its stream)."""
        if self._stop:
            raise KvdriveError("the engine is shut down")
        if self.max_waiting is not None and self.num_waiting >= self.max_waiting:
            raise QueueFull(f"{self.num_waiting} requests are waiting (the limit is {self.max_waiting}): retry later")
        stream = RequestStream(self, req, asyncio.get_running_loop())
        self._inbox.append(("add", stream))
        self._wake.set()
        return stream

    def abort(self, seq_id: int) -> None:
        self._inbox.append(("abort", seq_id))
        self._wake.set()

    def shutdown(self, timeout: float | None = 30.0) -> None:
        """Stop the engine thread after its current step; requests still in it end as aborted."""
        self._stop = True
        self._wake.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout)

    # -- the engine thread -------------------------------------------------------------
    def _run(self) -> None:
        try:
            while not self._stop:
                self._take_inbox()
                if self.engine.has_unfinished():
                    self._step()
                else:
                    self._publish()
                    self._wake.wait()
                    self._wake.clear()
        finally:
            for seq_id in list(self._streams):
                self._end(seq_id, "abort")

    def _take_inbox(self) -> None:
        now = time.perf_counter()
        while self._inbox:
            kind, item = self._inbox.popleft()
            if kind == "add":
                self._add(item, now)
            elif item in self._streams:
                self._end(item, "abort")

    def _add(self, stream: RequestStream, now: float) -> None:
        req = stream.req
        self._streams[req.seq_id] = stream
        self.observer.added(req, now)
        try:
            self.engine.add_request(req)
        except KvdriveError as err:
            self._streams.pop(req.seq_id)
            req.finish_reason, req.error = "error", str(err)
            self.observer.finished(req, now)
            self._send(stream, [TokenEvent(req.seq_id, -1, "", "error"), _END])

    def _step(self) -> None:
        try:
            events = self.engine.step()
        except Exception:  # a bug, or a device failure: the requests in flight end, the server goes on
            log.exception("engine step failed; the requests in flight end with an error")
            for seq_id in list(self._streams):
                self._end(seq_id, "error", "the engine failed while running this request (see the server log)")
            return
        now = time.perf_counter()
        if now - self._published >= self.stats_interval or any(e.finish_reason is not None for e in events):
            self._publish()  # before the events go out: a client that saw its request end sees it counted
        self.observer.tokens(events, now)
        by_seq: dict[int, list] = {}
        for event in events:
            by_seq.setdefault(event.seq_id, []).append(event)
        for seq_id, items in by_seq.items():
            stream = self._streams.get(seq_id)
            if stream is None:
                continue
            if items[-1].finish_reason is not None:
                del self._streams[seq_id]
                self.observer.finished(stream.req, now)
                items.append(_END)
            self._send(stream, items)

    def _end(self, seq_id: int, reason: str, error: str | None = None) -> None:
        """End ``seq_id`` now (freeing its KV) and close its stream."""
        stream = self._streams.pop(seq_id)
        if self.engine.abort(seq_id, reason, error) is None:  # not in the engine any more
            stream.req.finish_reason, stream.req.error = reason, error
        self.observer.finished(stream.req, time.perf_counter())
        items = [TokenEvent(seq_id, -1, "", reason)] if reason == "error" else []
        self._send(stream, [*items, _END])

    def _send(self, stream: RequestStream, items: list) -> None:
        with contextlib.suppress(RuntimeError):  # its event loop is closed: nobody reads this stream any more
            stream._loop.call_soon_threadsafe(stream._deliver, items)

    def _publish(self) -> None:
        self.snapshot = self.engine.snapshot()
        self._published = time.perf_counter()
