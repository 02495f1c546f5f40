"""The queue's removal thread: batches of delivered messages, one job at a time.

A ThreadPoolExecutor job costs, besides the hand-off itself, a
concurrent.futures.Future (a Condition and its lock), a work item, a
semaphore and its bookkeeping on both threads, and run_in_executor chains an
asyncio future to it. Here a job is a tuple on a SimpleQueue, and its outcome
(its result or its exception) reaches the event loop by one
call_soon_threadsafe. Jobs run in the order they were started.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
from collections.abc import Callable
from typing import Any, Generic, TypeVar

A = TypeVar("A")
R = TypeVar("R")

# What a job's `done` gets: its result, or the exception it raised.
Outcome = Any


class _Job(Generic[A, R]):
    __slots__ = ("arg", "done", "fn", "loop")

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop | None,  # None: nobody is told
        fn: Callable[[A], R],
        arg: A,
        done: Callable[[R | BaseException], None],
    ) -> None:
        self.loop, self.fn, self.arg, self.done = loop, fn, arg, done


class JobThread:
    """One daemon thread, started at the first job (so after any fork)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._jobs: queue.SimpleQueue[_Job[Any, Any] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()  # starting and stopping the thread

    def start_job(
        self,
        loop: asyncio.AbstractEventLoop,
        fn: Callable[[A], R],
        arg: A,
        done: Callable[[R | BaseException], None],
    ) -> None:
        """Runs fn(arg) on the thread; then done(result or exception) on `loop`."""
        if self._thread is None:
            self._start()
        self._jobs.put(_Job(loop, fn, arg, done))

    async def run(self, fn: Callable[[A], R], arg: A) -> R:
        """fn(arg) on the thread, awaited. A cancelled caller does not stop a started job."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[R] = loop.create_future()

        def done(outcome: R | BaseException) -> None:
            if future.done():
                return
            if isinstance(outcome, BaseException):
                future.set_exception(outcome)
            else:
                future.set_result(outcome)

        self.start_job(loop, fn, arg, done)
        return await future

    def wait_idle(self) -> None:
        """Blocks until every job started before has run (for tests and shutdown)."""
        if self._thread is None:
            return
        ran = threading.Event()
        self._jobs.put(_Job(None, lambda _: ran.set(), None, lambda _: None))
        ran.wait()

    def shutdown(self) -> None:
        """Runs what was started, then ends the thread."""
        with self._lock:
            thread, self._thread = self._thread, None
        if thread is not None:
            self._jobs.put(None)
            thread.join()

    def _start(self) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._work, name=self.name, daemon=True)
                self._thread.start()

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            outcome: Outcome
            try:
                outcome = job.fn(job.arg)
            except BaseException as e:  # handed to the loop, as a pool's future would
                outcome = e
            if job.loop is None:
                continue
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                job.loop.call_soon_threadsafe(job.done, outcome)
