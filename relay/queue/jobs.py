"""Jobs for the queue's commit threads: a tuple on a SimpleQueue, not a pool future.

A ThreadPoolExecutor job costs, besides the hand-off itself, a
concurrent.futures.Future (a Condition and its lock), a work item, a
semaphore and its bookkeeping on both threads, and run_in_executor chains an
asyncio future to it. Here a job is a small object on the commit threads'
SimpleQueue (relay.queue.incoming.Committer.start_job), and its outcome (its
result or the exception it raised) reaches the event loop by one
call_soon_threadsafe. await_owned is how the queue awaits a job whose outcome
holds a lock or a file, so that a cancelled caller loses neither.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any, Generic, TypeVar

A = TypeVar("A")
R = TypeVar("R")

# What a job's `done` gets: its result, or the exception it raised.
Outcome = Any


class Job(Generic[A, R]):
    __slots__ = ("arg", "done", "fn", "loop")

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop | None,  # None: nobody is told
        fn: Callable[[A], R],
        arg: A,
        done: Callable[[R | BaseException], None],
    ) -> None:
        self.loop, self.fn, self.arg, self.done = loop, fn, arg, done


# Starts fn(arg) on a thread, then done(outcome) on the loop: Committer.start_job.
StartJob = Callable[
    [asyncio.AbstractEventLoop | None, Callable[[Any], Any], Any, Callable[[Any], None]], None
]


async def run_awaited(start_job: StartJob, fn: Callable[[A], R], arg: A) -> R:
    """fn(arg) started by `start_job`, awaited. A cancelled caller does not stop a started job."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[R] = loop.create_future()

    def done(outcome: R | BaseException) -> None:
        if future.done():
            return
        if isinstance(outcome, BaseException):
            future.set_exception(outcome)
        else:
            future.set_result(outcome)

    start_job(loop, fn, arg, done)
    return await future


async def await_owned(job: asyncio.Future[R], let_go: Callable[[asyncio.Future[R]], None]) -> R:
    """Awaits `job`, whose outcome owns something (a claim's lock, a committed
    file). A caller cancelled meanwhile, also after the job ended but before the
    caller resumed (asyncio then drops the outcome), has `let_go(job)` called on
    the loop once the job is done; the job itself runs on (shielded)."""
    try:
        return await asyncio.shield(job)
    except asyncio.CancelledError:
        job.add_done_callback(let_go)
        raise


def run_job(job: Job[Any, Any]) -> None:
    """Runs a job on the calling thread and tells its loop the outcome."""
    outcome: Outcome
    try:
        outcome = job.fn(job.arg)
    except BaseException as e:  # handed to the loop, as a pool's future would
        outcome = e
    if job.loop is None:
        return
    with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
        job.loop.call_soon_threadsafe(job.done, outcome)
