"""Bounded calls into a store that may hang: a worker thread with deadlines, and a circuit breaker.

A client call into a distributed store cannot be interrupted: against a dead master each
one blocks for seconds. So the caller never makes it itself. ``Worker`` runs calls in
order on one daemon thread; the thread that waits for a call enforces its deadline, and a
call past it is a ``Timeout`` for its waiter while it keeps running. Until it returns the
worker is *stuck*: calls queued behind it are cancelled and new ones refused at once, so
no waiter ever queues behind a hung call. ``Breaker`` turns failures into a pause: after
one, the store is skipped for ``retry_after_s``, then calls go through again.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable

POLL_S = 0.01  # how often a waiter checks the running call's deadline


class Timeout(Exception):
    """The call ran past its deadline; it may still be running."""


class Refused(Exception):
    """The call never ran: the worker was stuck, closed, or the call was cancelled."""


class Breaker:
    """Closed (calls allowed) until ``failure()``; then open for ``retry_after_s``; then calls
    are allowed again, and the next failure reopens it. Thread-safe."""

    def __init__(self, retry_after_s: float, clock: Callable[[], float] = time.monotonic):
        self.retry_after_s, self.clock = retry_after_s, clock
        self.opens = 0
        self.last_failure = ""
        self._open_until = 0.0
        self._lock = threading.Lock()

    def allow(self) -> bool:
        return self.clock() >= self._open_until

    def failure(self, why: str) -> None:
        with self._lock:
            if self.allow():
                self.opens += 1
            self._open_until = self.clock() + self.retry_after_s
            self.last_failure = why

    @property
    def state(self) -> str:
        return "closed" if self.allow() else "open"


class Call:
    """One queued call; ``Worker.wait`` gives its value or raises."""

    __slots__ = ("fn", "budget_s", "on_cancel", "started", "done", "value", "error")

    def __init__(self, fn: Callable, budget_s: float, on_cancel: Callable | None):
        self.fn, self.budget_s, self.on_cancel = fn, budget_s, on_cancel
        self.started: float | None = None
        self.done = threading.Event()
        self.value = None
        self.error: BaseException | None = None

    def _finish(self, value=None, error: BaseException | None = None) -> None:
        self.value, self.error = value, error
        self.done.set()


class Worker:
    """One daemon thread that runs calls in submission order (see the module doc).

    ``submit`` never blocks. ``wait`` returns within the call's deadline (counted from
    when it starts running) plus ``POLL_S``, or raises ``Timeout``/``Refused``/the call's
    own exception. ``on_cancel`` of a call that never runs is called once (its buffers can
    be reused). Daemon: a call blocked in the store never holds up interpreter exit."""

    def __init__(self, name: str):
        self._queue: deque[Call] = deque()
        self._cond = threading.Condition()
        self._current: Call | None = None
        self._stuck: Call | None = None
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    @property
    def stuck(self) -> bool:
        self._check_deadline()
        return self._stuck is not None

    def submit(self, fn: Callable, budget_s: float, on_cancel: Callable | None = None) -> Call:
        call = Call(fn, budget_s, on_cancel)
        self._check_deadline()
        with self._cond:
            if self._closed or self._stuck is not None:
                refuse = True
            else:
                refuse = False
                self._queue.append(call)
                self._cond.notify()
        if refuse:
            self._cancel(call, "the store is not answering" if not self._closed else "closed")
        return call

    def wait(self, call: Call):
        while not call.done.wait(POLL_S):
            self._check_deadline()
        if call.error is not None:
            raise call.error
        return call.value

    def idle(self, timeout: float) -> bool:
        """Wait until no call runs or is queued (or ``timeout``); True when idle."""
        end = time.monotonic() + timeout
        while True:
            self._check_deadline()
            with self._cond:
                if not self._queue and self._current is None:
                    return True
                left = end - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(POLL_S * 10, left))

    def close(self, timeout: float) -> None:
        """Run what is queued for up to ``timeout`` s, then cancel the rest; never waits on a hung call."""
        self.idle(timeout)
        with self._cond:
            self._closed = True
            rest, self._queue = list(self._queue), deque()
            self._cond.notify_all()
        for call in rest:
            self._cancel(call, "closed")

    def _check_deadline(self) -> None:
        with self._cond:
            cur = self._current
            if cur is None or cur is self._stuck or cur.started is None:
                return
            if time.monotonic() - cur.started <= cur.budget_s:
                return
            self._stuck = cur
            rest, self._queue = list(self._queue), deque()
        cur._finish(error=Timeout(f"no answer in {cur.budget_s:.2f} s"))
        for call in rest:
            self._cancel(call, "cancelled behind a call that is not answering")

    @staticmethod
    def _cancel(call: Call, why: str) -> None:
        if call.on_cancel is not None:
            call.on_cancel()
        call._finish(error=Refused(why))

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._closed:
                    self._cond.wait()
                if not self._queue:
                    return
                call = self._current = self._queue.popleft()
                call.started = time.monotonic()
            try:
                value, error = call.fn(), None
            except BaseException as err:  # handed to the waiter
                value, error = None, err
            with self._cond:
                self._current = None
                if self._stuck is call:
                    self._stuck = None  # its waiter already has a Timeout; the result is dropped
                else:
                    call._finish(value, error)
                self._cond.notify_all()
